"""Checkpoint save / verify / load time and size for one recipe and layout (run under torchrun).

    torchrun --nproc_per_node N -m sessa_pt.train.bench_checkpoint RECIPE [KEY=VALUE ...] \
        --dir DIR [--repeats 3]

Builds the model and DeepSpeed engine exactly as training does (no data is read), runs one
optimizer step on random tokens so that every AdamW state exists, then saves, verifies (every
rank checks its share of the manifest) and loads the checkpoint ``--repeats`` times. Rank 0
prints one markdown row: the median times (seconds, wall clock between barriers) and the size.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import time

import torch
import torch.distributed as dist


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--dir", required=True, type=pathlib.Path,
                    help="where the checkpoints are written (removed afterwards)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--header", action="store_true", help="print the table header first")
    args = ap.parse_args(argv)

    from sessa_pt.config import load_config
    from sessa_pt.models.lm import DecoderLM
    from sessa_pt.parallel.engine import build_engine
    from sessa_pt.parallel.model import SequentialLM, build_pipeline
    from sessa_pt.parallel.topology import (
        deepspeed_topology,
        device,
        init_distributed,
        init_parallel,
        megatron_mpu,
    )
    from sessa_pt.train import checkpoint as ckpt
    from sessa_pt.train.ckpt_files import MANIFEST, read_manifest

    cfg = load_config(args.recipe, args.overrides)
    init_distributed()
    lay = init_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.run.seed)
    cuda = torch.cuda.is_available()
    if lay.pp > 1:
        model, mpu = build_pipeline(cfg.model, cfg.run.seed, lay, deepspeed_topology(lay)), None
    else:
        model, mpu = SequentialLM(cfg.model, cfg.run.seed, lay), megatron_mpu()
    engine = build_engine(model, cfg, lay.dp, cuda, mpu=mpu)
    # One optimizer step on random tokens: every AdamW state then exists, as in a real run.
    t, b = cfg.data.seq_len, cfg.train.micro_batch_size
    gas = cfg.train.global_batch_size // (b * lay.dp)
    gen = torch.Generator().manual_seed(lay.dp_rank)

    def batch():
        ids = torch.randint(0, cfg.model.vocab_size, (b, t), generator=gen).to(device())
        return ids, ids.roll(-1, 1), torch.ones_like(ids, dtype=torch.float32)

    if lay.pp > 1:
        engine.train_batch(iter([(x, (y, m)) for x, y, m in (batch() for _ in range(gas))]))
    else:
        for _ in range(gas):
            loss = engine(*batch())
            engine.backward(loss)
            engine.step()
    state = {"step": 1, "consumed_samples": cfg.train.global_batch_size,
             "data_cursor": cfg.train.global_batch_size,
             "global_batch_size": cfg.train.global_batch_size, "seed": cfg.run.seed,
             "world_size": lay.world_size, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp,
             "zero_stage": cfg.parallel.zero_stage, "mlflow_run_id": None,
             "total_steps": cfg.train.steps}
    root = args.dir / "checkpoints"
    save_s, verify_s, load_s = [], [], []
    path = None
    for _ in range(args.repeats):
        def save():
            nonlocal path
            path = ckpt.save_checkpoint(root, 1, engine, lay, state, "{}\n", keep_last=1)
        save_s.append(_timed(save))
        verify_s.append(_timed(lambda: ckpt.find_resumable(root, lambda m: None)))
        load_s.append(_timed(lambda: ckpt.load_checkpoint(path, engine, lay, cfg)))
    if lay.rank == 0:
        files = read_manifest(path)["files"]
        size = sum(f["bytes"] for f in files.values())
        with torch.device("meta"):
            n = DecoderLM(cfg.model).num_params()["total"]
        cols = ["recipe", "params", "world", "layout", "files", "size MB", "save s",
                "verify s", "load s"]
        row = [cfg.run.name or pathlib.Path(args.recipe).stem, f"{n / 1e6:.2f}M", lay.world_size,
               f"tp{lay.tp} pp{lay.pp} dp{lay.dp} z{cfg.parallel.zero_stage}",
               len(files) + 2,   # + MANIFEST.json, COMPLETE
               f"{size / 2**20:.1f}", f"{statistics.median(save_s):.2f}",
               f"{statistics.median(verify_s):.2f}", f"{statistics.median(load_s):.2f}"]
        if args.header:
            print("| " + " | ".join(cols) + " |")
            print("|" + "---|" * len(cols))
        print("| " + " | ".join(str(c) for c in row) + " |", flush=True)
        assert (path / MANIFEST).is_file()
        shutil.rmtree(args.dir, ignore_errors=True)
    dist.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
