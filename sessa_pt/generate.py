"""``sessa-generate CHECKPOINT_OR_RUN_DIR --prompt TEXT``: sample text from a trained model.

Decoding is ``DecoderLM.generate``: a prefill of the prompt, then one token per step through the
model's recurrent caches (Sessa's feedback read is the fused Triton decode kernel on CUDA). Each
prompt starts as a training document did (after the eos that ends the previous document, or
after bos when the shards added one). ``--temperature 0`` is greedy; the same ``--seed`` gives
the same text. Prompts of the same token length are decoded together, up to ``--batch-size``
rows (the caches have no padding). With --batch-size 1 the text streams as it is generated; larger
batches print each completion, as "[i] prompt completion", when its batch is done. The
throughput goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TextIO

import torch


class TextStream:
    """Writes a growing decoded continuation: decodes all tokens so far and prints what is new
    (a byte-fallback character may need several tokens, so no token is printed alone)."""

    def __init__(self, decode: Callable[[list[int]], str], out: TextIO) -> None:
        self.decode, self.out = decode, out
        self.ids: list[int] = []
        self.printed = ""

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def finish(self) -> str:
        text = self.decode(self.ids)
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
        self.out.flush()
        return text


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as fh:
            prompts += [line.rstrip("\n") for line in fh if line.strip()]
    if not prompts:
        raise SystemExit("give at least one --prompt TEXT or a --prompts-file (one per line)")
    return prompts


def batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped by token length, at most ``batch_size`` per group, in order of
    first appearance."""
    groups: dict[int, list[list[int]]] = {}
    order: list[list[int]] = []
    for i, n in enumerate(lengths):
        g = groups.setdefault(n, [])
        if not g or len(g[-1]) >= batch_size:
            g.append([])
            order.append(g[-1])
        g[-1].append(i)
    return order


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sessa-generate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory (step_XXXXXXXX) or run directory")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1,
                   help="prompts of one token length decoded together (1 streams the text)")
    p.add_argument("--no-stop-at-eos", action="store_true",
                   help="keep generating past the end-of-document token")
    p.add_argument("--tokenizer", help="the run's sentencepiece .model (default: the one its "
                                       "data manifests name)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights dtype (auto: float32, with bf16 autocast on CUDA)")
    p.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    return p


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    from sessa_pt.eval.common import autocast, load_model
    from sessa_pt.eval.run_tokenizer import find_run_tokenizer

    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise SystemExit("--max-new-tokens and --batch-size must be >= 1")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise SystemExit("need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    prompts = read_prompts(args)
    loaded = load_model(args.checkpoint, args.device, args.dtype)
    run_tok = find_run_tokenizer(loaded.cfg, args.tokenizer)
    sp = run_tok.processor()
    eos = None if args.no_stop_at_eos or sp.eos_id() < 0 else sp.eos_id()
    encoded = [run_tok.prefix(sp) + sp.encode(p) for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise SystemExit("an empty prompt with a tokenizer that has no bos/eos: give some text")
    dev = loaded.device
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    print(f"[sessa-generate] {loaded.checkpoint} (step {loaded.step}, {loaded.cfg.model.mixer}/"
          f"{loaded.cfg.model.block}, {dev})", file=sys.stderr, flush=True)
    new_tokens, prefill_tokens, t0 = 0, 0, time.perf_counter()
    for group in batches([len(e) for e in encoded], args.batch_size):
        x = torch.tensor([encoded[i] for i in group], dtype=torch.long, device=dev)
        stream = TextStream(sp.decode, out) if args.batch_size == 1 else None
        if stream is not None:
            out.write(prompts[group[0]])
            out.flush()

        def on_token(step: int, tok: torch.Tensor, stream=stream) -> None:
            if stream is not None and (eos is None or int(tok[0, 0]) != eos):
                stream.push(int(tok[0, 0]))

        with autocast(dev, not args.no_bf16):
            new = loaded.model.generate(x, args.max_new_tokens, temperature=args.temperature,
                                        top_k=args.top_k, top_p=args.top_p, generator=gen,
                                        eos_id=eos, vocab_limit=sp.get_piece_size(),
                                        on_token=on_token)
        prefill_tokens += x.numel()
        for row, i in enumerate(group):
            ids = new[row].tolist()
            if eos is not None and eos in ids:
                ids = ids[:ids.index(eos)]
            new_tokens += len(ids)
            if stream is not None:
                stream.finish()
                out.write("\n")
            else:
                out.write(f"[{i}] {prompts[i]}{sp.decode(ids)}\n")
        out.flush()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(f"[sessa-generate] {new_tokens} new tokens in {dt:.2f} s: {new_tokens / dt:.1f} "
          f"tokens/s ({len(prompts)} prompts, {prefill_tokens} prompt tokens)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
