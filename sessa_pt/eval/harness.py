"""``sessa-eval harness``: lm-evaluation-harness on a checkpoint, offline.

:class:`SessaHarnessLM` is an lm-eval ``LM`` (registered as ``sessa``) around our model and the
run's sentencepiece tokenizer; it implements ``loglikelihood``, ``loglikelihood_rolling`` and
``generate_until`` (greedy unless the task asks to sample, through ``DecoderLM.generate`` and
its recurrent caches). Every context starts as a training document did (after the eos of the
document before, or bos when the shards added one), and inputs are cut on the left to the
context the model was trained on (``data.seq_len``).

Two local tasks are written next to their data (lm-eval YAML with ``dataset_path: json`` and
local ``data_files``, so no hub access), built from the run's held-out split (``data.valid``):

* ``sessa_cloze``: LAMBADA-style last-word prediction (loglikelihood; acc, perplexity): the
  held-out documents cut into passages of whole sentences that fit the trained context, each
  passage's last word (a run of letters) as the target;
* ``sessa_passkey``: passkey retrieval (generate_until; exact match of the first integer), the
  prompt of ``sessa_data.tasks.passkey`` at the trained length, needle depths 0, 0.5, 1.

Other names go to lm-eval's own task index (``--tasks hellaswag`` works where the datasets are
in the local Hugging Face cache; ``HF_DATASETS_OFFLINE`` and ``HF_HUB_OFFLINE`` are set unless
already set).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import random
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from sessa_pt.eval.common import Loaded, autocast

LOCAL_TASKS = ("sessa_cloze", "sessa_passkey")
# passage boundaries: a sentence end, or a line end (verse and hard-wrapped prose have long
# sentences; a line's last word is still a word to predict from its context)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")
_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{2,})([^\sA-Za-z0-9]*)$", re.DOTALL)


def set_offline() -> None:
    """No hub access (read by huggingface_hub and datasets when they are imported)."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(var, "1")


# ---- the model ---------------------------------------------------------------------------------

def _lm_base():
    from lm_eval.api.model import LM

    return LM


class SessaHarnessLM(_lm_base()):
    """lm-eval's view of a loaded sessa_pt checkpoint."""

    def __init__(self, loaded: Loaded | None = None, sp=None, prefix: list[int] | None = None,
                 checkpoint: str | None = None, tokenizer: str | None = None,
                 batch_size: int | str = 8, device: str = "auto", bf16: bool = True,
                 max_length: int | None = None, **_: Any) -> None:
        super().__init__()
        if loaded is None:
            from sessa_pt.eval.common import load_model

            if checkpoint is None:
                raise ValueError("SessaHarnessLM needs checkpoint=PATH (or a loaded model)")
            loaded = load_model(checkpoint, device)
        if sp is None:
            from sessa_pt.eval.run_tokenizer import find_run_tokenizer

            run_tok = find_run_tokenizer(loaded.cfg, tokenizer)
            sp, prefix = run_tok.processor(), run_tok.prefix(run_tok.processor())
        self.loaded, self.model, self.sp = loaded, loaded.model, sp
        self.prefix = list(prefix or [])
        if not self.prefix:
            raise ValueError("the tokenizer has neither bos nor eos: nothing to start a "
                             "context with")
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length or loaded.cfg.data.seq_len)
        self.bf16 = bf16
        self._device = loaded.device

    # lm-eval reads these
    @property
    def eot_token_id(self) -> int:
        return self.sp.eos_id()

    @property
    def prefix_token_id(self) -> int:
        return self.prefix[-1]

    def tok_encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def tok_decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, cut where whole-string tokenisation puts the boundary
        (a trailing space of the context belongs to the continuation's first piece)."""
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation = context[-n_space:] + continuation
            context = context[:-n_space]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context) if context else []
        if whole[:len(ctx)] != ctx:      # the boundary merged into one piece: score apart
            return self.prefix + ctx, self.tok_encode(continuation)
        return self.prefix + ctx, whole[len(ctx):]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy?) per pair; inputs are cut on the left
        to ``max_length`` tokens. Pairs of one input length run as one batch."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        prepared = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                results[i] = (0.0, True)
                continue
            full = (ctx + cont)[-(self.max_length + 1):]
            prepared.append((i, full[:-1], len(cont)))
        by_len: dict[int, list] = {}
        for item in prepared:
            by_len.setdefault(len(item[1]), []).append(item)
        dev = self.loaded.device
        for items in by_len.values():
            for b in range(0, len(items), self.batch_size):
                chunk = items[b:b + self.batch_size]
                x = torch.tensor([inp for _, inp, _ in chunk], dtype=torch.long, device=dev)
                with autocast(dev, self.bf16):
                    logits = self.model(x)
                logp = F.log_softmax(logits.float(), dim=-1)
                for row, (i, inp, n) in enumerate(chunk):
                    full = pairs[i][0] + pairs[i][1]
                    target = torch.tensor(full[-n:], device=dev)
                    lp = logp[row, -n:]
                    score = lp.gather(-1, target.unsqueeze(-1)).sum().item()
                    greedy = bool((lp.argmax(-1) == target).all())
                    results[i] = (score, greedy)
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([self._split(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for r in requests:
            (text,) = r.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, 1)]
            out.append(sum(s for s, _ in self._score(windows)))
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out = []
        dev = self.loaded.device
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            ctx = (self.prefix + self.tok_encode(context))[-max(1, self.max_length - max_new):]
            new: list[int] = []

            def stop(step: int, tok: torch.Tensor, new=new, until=until) -> bool:
                new.append(int(tok[0, 0]))
                text = self.tok_decode(new)
                return any(u in text for u in until)

            x = torch.tensor([ctx], dtype=torch.long, device=dev)
            with autocast(dev, self.bf16):
                self.model.generate(x, max_new, temperature=temperature,
                                    top_k=int(kwargs.pop("top_k", 0) or 0),
                                    top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                                    eos_id=self.eot_token_id,
                                    vocab_limit=self.sp.get_piece_size(), on_token=stop)
            if self.eot_token_id in new:
                new = new[:new.index(self.eot_token_id)]
            text = self.tok_decode(new)
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


def register() -> None:
    """Make ``--model sessa --model_args checkpoint=DIR`` available to lm-eval's own CLI."""
    from lm_eval.api.registry import MODEL_REGISTRY, register_model

    if "sessa" not in MODEL_REGISTRY:
        register_model("sessa")(SessaHarnessLM)


# ---- the local tasks ---------------------------------------------------------------------------

def held_out_documents(manifest: str | pathlib.Path) -> Iterator[list[int]]:
    """The documents (ids, eos dropped) of a packed text split, in order: the samples are
    re-joined into the split's stream (they overlap by one token) and cut at eos. The last one
    is usually cut short (packing drops the tail that does not fill a sample); it is kept, as
    the passages made from it are whole sentences anyway."""
    from sessa_pt.data.dataset import TokenShardDataset

    ds = TokenShardDataset(manifest)
    if ds.manifest.kind != "lm":
        raise SystemExit(f"{manifest} is a {ds.manifest.kind!r} split, not text: the local "
                         "harness tasks need a text run's held-out split")
    eos = ds.manifest.tokenizer.get("eos_id")
    current: list[int] = []
    for i in range(ds.num_samples):
        toks = ds.tokens_numpy(i).tolist()
        for t in toks if i == 0 else toks[1:]:
            if t != eos:
                current.append(t)
            elif current:
                yield current
                current = []
    if current:
        yield current


def cloze_examples(sp, docs: Iterable[list[int]], max_tokens: int,
                   limit: int) -> list[dict[str, str]]:
    """LAMBADA-style examples: each document is cut into consecutive passages of whole
    sentences or lines (at most ``max_tokens`` tokens each); a passage's last word (letters
    only, its closing punctuation dropped) is the target and everything before it the
    context. At most ``limit`` examples; passages with fewer than 8 context words are
    skipped."""
    out: list[dict[str, str]] = []
    for ids in docs:
        text = sp.decode(ids)
        cuts = [m.end() for m in _SENTENCE_END.finditer(text)]
        start, size, passage_start = 0, 0, 0
        for end in cuts:
            n = len(sp.encode(text[start:end]))
            if size and size + n > max_tokens:
                _add_cloze(out, text[passage_start:start])
                passage_start, size = start, 0
            if n > max_tokens:         # a sentence longer than the window: skip it
                passage_start, size, start = end, 0, end
                continue
            size += n
            start = end
            if len(out) >= limit:
                return out
        _add_cloze(out, text[passage_start:start])
        if len(out) >= limit:
            return out[:limit]
    return out


def _add_cloze(out: list[dict[str, str]], passage: str) -> None:
    m = _WORD.match(passage.strip())
    if m is not None and len(m.group(1).split()) >= 8:
        out.append({"context": m.group(1), "target": " " + m.group(2)})


def passkey_examples(sp, length: int, samples: int, seed: int = 0) -> list[dict[str, str]]:
    """Passkey prompts of at most ``length`` tokens at needle depths 0, 0.5 and 1."""
    from sessa_data.tasks.passkey import FILLER, INTRO, NEEDLE, QUESTION

    rng = random.Random(seed)
    out = []
    for depth in (0.0, 0.5, 1.0):
        for _ in range(samples):
            key = rng.randint(1, 50000)
            fixed = len(sp.encode(INTRO + NEEDLE.format(key=key) + QUESTION)) + 1
            repeats = (length - fixed) // len(sp.encode(FILLER))
            if repeats < 1:
                raise SystemExit(f"a passkey prompt does not fit in {length} tokens with this "
                                 "tokenizer; pass --passkey-length")
            at = round(depth * repeats)
            prompt = INTRO + FILLER * at + NEEDLE.format(key=key) + FILLER * (repeats - at) \
                + QUESTION
            out.append({"prompt": prompt, "key": str(key), "depth": depth})
    return out


CLOZE_YAML = """task: sessa_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

PASSKEY_YAML = """task: sessa_passkey
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{key}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 10
  do_sample: false
filter_list:
  - name: first_int
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_local_tasks(out: pathlib.Path, loaded: Loaded, sp, tasks: list[str],
                      cloze_examples_max: int = 500, passkey_samples: int = 4,
                      passkey_length: int | None = None) -> dict[str, int]:
    """Write the asked-for local tasks (YAML + JSONL) into ``out``; returns examples per task."""
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    if "sessa_cloze" in tasks:
        valid = pathlib.Path(loaded.cfg.data.valid) if loaded.cfg.data.valid else None
        if valid is not None and valid.is_dir():
            valid = valid / "manifest.json"
        if valid is None or not valid.is_file():
            raise SystemExit(f"sessa_cloze needs the run's held-out split: data.valid "
                             f"({loaded.cfg.data.valid!r}) is not there (paths are relative to "
                             "where training ran)")
        # one token of the trained window is the document-start prefix
        rows = cloze_examples(sp, held_out_documents(valid), loaded.cfg.data.seq_len - 1,
                              cloze_examples_max)
        if not rows:
            raise SystemExit(f"no held-out document in {valid} is long enough for a cloze "
                             "example")
        _write_task(out, "sessa_cloze", CLOZE_YAML, rows)
        sizes["sessa_cloze"] = len(rows)
    if "sessa_passkey" in tasks:
        rows = passkey_examples(sp, passkey_length or loaded.cfg.data.seq_len, passkey_samples)
        _write_task(out, "sessa_passkey", PASSKEY_YAML, rows)
        sizes["sessa_passkey"] = len(rows)
    return sizes


def _write_task(out: pathlib.Path, name: str, template: str, rows: list[dict]) -> None:
    data = out / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (out / f"{name}.yaml").write_text(template.format(data=json.dumps(str(data.resolve()))))


# ---- running -----------------------------------------------------------------------------------

def run_harness(loaded: Loaded, sp, prefix: list[int], tasks: list[str], task_dir: pathlib.Path,
                limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                bf16: bool = True, seed: int = 0, max_length: int | None = None,
                bootstrap_iters: int = 1000) -> dict[str, Any]:
    """lm_eval.simple_evaluate on our model; the local tasks must be in ``task_dir``.
    ``bootstrap_iters``: resamples for the standard errors lm-eval cannot compute in closed
    form (perplexity); 0 skips them."""
    set_offline()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    register()
    lm = SessaHarnessLM(loaded, sp, prefix, batch_size=batch_size, bf16=bf16,
                        max_length=max_length)
    # Indexing lm-eval's own few thousand task configs takes seconds: only when asked for.
    manager = TaskManager(include_path=str(task_dir),
                          include_defaults=not set(tasks) <= set(LOCAL_TASKS))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SystemExit(f"unknown harness task(s) {unknown}: the local tasks are "
                         f"{list(LOCAL_TASKS)}; others must be lm-eval task names")
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, log_samples=False,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, bootstrap_iters=bootstrap_iters)
    return results


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``harness_<task>_<metric>[_<filter>]`` for every finite numeric result (stderr
    excluded)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            name = f"harness_{task}_{metric}" + ("" if filt == "none" else f"_{filt}")
            if math.isfinite(float(value)):
                out[re.sub(r"[^A-Za-z0-9_]+", "_", name)] = float(value)
    return out
