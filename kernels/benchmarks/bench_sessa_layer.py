"""Sessa layer vs SDPA attention layer on one GPU: fwd+bwd time and peak memory, and decoding.

The layer is the paper's gated block (LN -> W_in -> GELU / gate -> mixer -> W_out, residual,
``sessa_pt.models.blocks.GatedBlock``) with the mixer ``SessaMixer(impl=dense|chunked|triton)``
or ``AttentionMixer``; ``triton`` is the triton mixer with ``solve="queue"``, ``triton_panel``
with ``solve="panel"`` (the default of ``model.sessa.solve``), ``triton_panel_c128`` the same
with 128-row chunks (``model.sessa.chunk_size=128``), ``triton_panel_m64`` with a 64 MiB
scratch budget (``model.sessa.panel_mib=64``), ``triton_panel_inv`` with
``solve="panel_inverse"`` (``triton_panel_inv_c128``: and 128-row chunks); a ``+compile``
suffix runs the block under torch.compile (e.g. ``attention+compile,triton_panel+compile``).
D=1024, 16 heads, bf16, 16k tokens per batch (B = 16384 / T, B = 1 beyond). Peak memory is the
peak allocated during fwd+bwd minus what was allocated before (weights and the input). Run on the GPU machine:

    PYTHONPATH=$PWD:$PWD/kernels python3 kernels/benchmarks/bench_sessa_layer.py \
        [--seq 512,2048,8192] [--impls attention,triton,triton_panel,chunked,dense] \
        [--decode 1024,8192] [--decode-batch 1,16] [--no-graphs] [--json out.json]

``--seq ''`` skips the layer benchmark, ``--decode ''`` the decode benchmark.
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import json
import time

import torch
from cuda_timing import median_ms
from torch import nn

from sessa_pt.models.attention import AttentionMixer
from sessa_pt.models.sessa import SessaMixer

D, H, TOKENS = 1024, 16, 16384


# Layer variants that are the triton mixer under other kernel settings (model.sessa fields).
TRITON_VARIANTS = {
    "triton": {"solve": "queue", "chunk_size": 64},
    "triton_panel": {"solve": "panel", "chunk_size": 64},
    # half the sequential depth of the solves (T / 128 chunk steps), 2x the in-chunk work
    "triton_panel_c128": {"solve": "panel", "chunk_size": 128},
    # a quarter of the default scratch budget: at T=8192, B=2 the default's panels hold 7680 of
    # the 8192 rows (0.25 GiB); 64 MiB caps them at 1920 rows
    "triton_panel_m64": {"solve": "panel", "chunk_size": 64, "panel_mib": 64.0},
    # the in-chunk inverses formed in the parallel pass: one product per sequential chunk step
    "triton_panel_inv": {"solve": "panel_inverse", "chunk_size": 64},
    # the same with 128-row chunks: half the sequential steps, each one 128 x 128 x 128 product
    "triton_panel_inv_c128": {"solve": "panel_inverse", "chunk_size": 128},
}
COMPILED = "+compile"       # suffix: the same block under torch.compile (e.g. triton_panel+compile)


def make_block(impl: str) -> nn.Module:
    from sessa_pt.models.blocks import GatedBlock

    base = impl.removesuffix(COMPILED)
    if base == "attention":
        mixer = AttentionMixer(D, H)
    elif base in TRITON_VARIANTS:
        mixer = SessaMixer(D, H, impl="triton", **TRITON_VARIANTS[base])
    else:
        mixer = SessaMixer(D, H, impl=base, chunk_size=128)
    block = GatedBlock(D, mixer).cuda().to(torch.bfloat16)
    return torch.compile(block) if impl.endswith(COMPILED) else block


def time_fwd_bwd(block: nn.Module, B: int, T: int, budget_s: float = 2.0
                 ) -> tuple[float, float]:
    """Median ms of fwd+bwd and peak extra GiB."""
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)

    def step() -> None:
        y = block(x)
        y.backward(dy)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()                                    # warm-up (compilation, autotune, allocator)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    n = max(2, min(20, int(budget_s / max(first, 1e-3))))
    return median_ms(step, n, warmup=0), peak


def time_fwd(block: nn.Module, B: int, T: int, n: int = 5) -> float:
    """Median ms of the forward alone (no autograd graph)."""
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)

    @torch.no_grad()
    def step() -> None:
        block(x)

    return median_ms(step, n, warmup=1)


def bench_layers(seqs: list[int], impls: list[str], limits: dict[str, int]) -> list[dict]:
    rows = []
    for T in seqs:
        B = max(1, TOKENS // T)
        for impl in impls:
            row = {"T": T, "B": B, "impl": impl}
            if T > limits.get(impl, 1 << 30):
                row["status"] = "skipped"
            else:
                # every (T, grad mode) is a recompile of the one block class: start afresh so
                # that dynamo's recompile limit never sends a later row to eager mode
                torch._dynamo.reset()
                block = make_block(impl)
                try:
                    row["ms"], row["gib"] = time_fwd_bwd(block, B, T)
                    row["fwd_ms"] = time_fwd(block, B, T)
                    row["status"] = "ok"
                except torch.OutOfMemoryError:
                    row["status"] = "OOM"
                del block
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def print_layer_table(rows: list[dict], impls: list[str]) -> None:
    """ms and GiB per impl; then each Sessa impl's time and memory over the attention layer's
    (``attention+compile`` for compiled impls when it was run, else ``attention``)."""
    by = {(r["T"], r["impl"]): r for r in rows}
    seqs = sorted({r["T"] for r in rows})
    ok = {k for k, r in by.items() if r.get("status") == "ok"}
    head = f"{'T':>7} {'B':>3} " + " ".join(f"{i + ' ms':>22} {'GiB':>6} {'fwd ms':>8}"
                                          for i in impls)
    print("\n" + head)
    for T in seqs:
        cells = []
        for i in impls:
            r = by.get((T, i), {})
            cells.append(f"{r['ms']:22.2f} {r['gib']:6.2f} {r['fwd_ms']:8.2f}" if (T, i) in ok
                         else f"{r.get('status', '-'):>22} {'':>6} {'':>8}")
        print(f"{T:7d} {max(1, TOKENS // T):3d} " + " ".join(cells))
    sessa = [i for i in impls if not i.startswith("attention")]
    print(f"\n{'T':>7} " + " ".join(f"{i + ' / attn time, mem':>34}" for i in sessa))
    for T in seqs:
        cells = []
        for i in sessa:
            ref = "attention+compile" if i.endswith(COMPILED) and (T, "attention+compile") \
                in ok else "attention"
            if (T, i) in ok and (T, ref) in ok:
                r, a = by[(T, i)], by[(T, ref)]
                cells.append(f"{r['ms'] / a['ms']:27.2f}x {r['gib'] / a['gib']:5.2f}x")
            else:
                cells.append(f"{'-':>34}")
        print(f"{T:7d} " + " ".join(cells))


def bench_decode(contexts: list[int], B: int = 1, graphs: bool = True) -> list[dict]:
    """One decoding step of each layer at context P, caches preallocated (no concatenation):
    attention: block projections + SDPA over (K, V); Sessa: + feedback projections and the fused
    feedback read over (K_b, S). Eager (one launch per kernel from Python) and, with ``graphs``,
    the same step captured once in a CUDA graph (static input and caches, fixed P) and replayed:
    the launch overhead out, what is left is the GPU time of the step. ``graph_max_diff``: the
    largest |replay - eager| over both layers' outputs (expected 0 or bf16 rounding)."""
    import torch.nn.functional as F
    from cuda_timing import graph_median_ms
    from sessa_kernels.decode import feedback_decode_step

    rows = []
    att, ses = make_block("attention"), make_block("triton_panel")
    for P in contexts:
        x = torch.randn(B, 1, D, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(B, H, P, D // H, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        kb = torch.randn(B, P, D, device="cuda", dtype=torch.bfloat16)
        sc = torch.randn_like(kb)

        def attn_read(blk, a):
            m = blk.mixer
            q = m.q_proj(a).view(B, 1, H, D // H).transpose(1, 2)
            m.k_proj(a), m.v_proj(a)
            o = F.scaled_dot_product_attention(q, kc, vc)
            return m.out_proj(o.transpose(1, 2).reshape(B, 1, D))

        @torch.no_grad()
        def step_attn():
            a, g = att.W_in(att.ln(x)).chunk(2, dim=-1)
            return x + att.W_out(attn_read(att, F.gelu(a)) * g)

        @torch.no_grad()
        def step_sessa(impl="triton"):
            a, g = ses.W_in(ses.ln(x)).chunk(2, dim=-1)
            a = F.gelu(a)
            f = attn_read(ses, a)
            qb, _, gam = ses.mixer.feedback_inputs(a)
            s = feedback_decode_step(qb[:, 0], gam[:, 0], f[:, 0], kb, sc, impl=impl)
            return x + ses.W_out(s[:, None] * g)

        row = {"P": P, "B": B, "attn_ms": median_ms(step_attn, 50, warmup=3),
               "sessa_ms": median_ms(step_sessa, 50, warmup=3),
               "sessa_torch_ms": median_ms(lambda: step_sessa("torch"), 10, warmup=3)}
        row["ratio"] = row["sessa_ms"] / row["attn_ms"]
        if graphs:
            eager = (step_attn(), step_sessa())
            row["attn_graph_ms"], out_a, graph_a = graph_median_ms(step_attn, 100)
            row["sessa_graph_ms"], out_s, graph_s = graph_median_ms(step_sessa, 100)
            row["graph_ratio"] = row["sessa_graph_ms"] / row["attn_graph_ms"]
            row["graph_max_diff"] = max((o.float() - e.float()).abs().max().item()
                                        for o, e in zip((out_a, out_s), eager, strict=True))
            del eager, out_a, out_s, graph_a, graph_s
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    print_decode_table(rows)
    return rows


def print_decode_table(rows: list[dict]) -> None:
    nan = float("nan")
    print(f"\n{'P':>7} {'B':>3} {'attn ms':>9} {'sessa ms':>9} {'ratio':>6} {'torch-fb ms':>12}"
          f" {'attn graph ms':>14} {'sessa graph ms':>15} {'graph ratio':>12} {'max diff':>9}")
    for r in rows:
        print(f"{r['P']:7d} {r['B']:3d} {r['attn_ms']:9.3f} {r['sessa_ms']:9.3f} "
              f"{r['ratio']:6.2f} {r['sessa_torch_ms']:12.3f} "
              f"{r.get('attn_graph_ms', nan):14.3f} {r.get('sessa_graph_ms', nan):15.3f} "
              f"{r.get('graph_ratio', nan):12.2f} {r.get('graph_max_diff', nan):9.2g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", default="512,1024,2048,4096,8192,16384,32768,65536,131072")
    ap.add_argument("--impls", default="attention,triton,chunked,dense")
    ap.add_argument("--dense-max", type=int, default=16384)
    ap.add_argument("--chunked-max", type=int, default=32768)
    ap.add_argument("--decode", default="1024,8192,32768,131072",
                    help="decode contexts ('' to skip)")
    ap.add_argument("--decode-batch", default="1,16", help="decode batch sizes")
    ap.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the decode steps replayed from CUDA graphs")
    ap.add_argument("--json", default="", help="write all rows here")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    impls = args.impls.split(",")
    seqs = [int(s) for s in args.seq.split(",") if s]
    rows = bench_layers(seqs, impls, {"dense": args.dense_max, "chunked": args.chunked_max})
    dec = []
    if args.decode:
        for B in (int(b) for b in args.decode_batch.split(",")):
            dec += bench_decode([int(p) for p in args.decode.split(",")], B, args.graphs)
    print(f"\n# {time.strftime('%Y-%m-%d')} {torch.cuda.get_device_name()} torch "
          f"{torch.__version__}")
    if rows:
        print_layer_table(rows, impls)
    if dec:
        print_decode_table(dec)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"layers": rows, "decode": dec}, fh, indent=1)


if __name__ == "__main__":
    main()
