"""The training loop: one process per rank under torchrun.

Builds the layout (megatron parallel_state + DeepSpeed topology), the model (sequential or
pipelined, TP-converted), the DeepSpeed engine, the data loaders; resumes from the newest
complete checkpoint; then runs optimizer steps with logging, validation, checkpoints and
mlflow tracking until ``train.steps`` or a stop request (the file ``<run.dir>/STOP``, or
SIGUSR1/SIGTERM), which saves a checkpoint at the next step boundary and exits cleanly.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import sys
import time

import torch
import torch.distributed as dist
import yaml

from sessa_pt.config import Config, check, flatten, resolve_precision, to_dict
from sessa_pt.parallel.engine import build_engine
from sessa_pt.parallel.model import SequentialLM, build_pipeline
from sessa_pt.parallel.topology import (
    ParallelLayout,
    deepspeed_topology,
    device,
    init_parallel,
    megatron_mpu,
)
from sessa_pt.train import checkpoint as ckpt
from sessa_pt.train import faults
from sessa_pt.train.profiling import StepProfiler
from sessa_pt.train.tracking import Tracker, resolve_uri

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(cfg: Config) -> float:
    if cfg.run.peak_tflops > 0:
        return cfg.run.peak_tflops
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_BF16_TFLOPS.items():
            if key in name:
                return value
    return 0.0


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class StopRequest:
    """SIGUSR1/SIGTERM or the STOP file ask for a checkpoint and a clean exit."""

    def __init__(self, stop_file: pathlib.Path) -> None:
        self.stop_file, self.signalled = stop_file, False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signalled = True

    def requested(self) -> bool:
        """Collective: true on every rank if any rank saw a signal or rank 0 sees the file."""
        flag = self.signalled or (dist.get_rank() == 0 and self.stop_file.exists())
        t = torch.tensor([1.0 if flag else 0.0], device=device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.cuda = torch.cuda.is_available()
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        check(cfg, self.world, self.cuda)
        self.precision = resolve_precision(cfg, self.cuda)
        self.run_dir = pathlib.Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.layout: ParallelLayout = init_parallel(cfg.parallel.tp, cfg.parallel.pp,
                                                    cfg.run.seed)
        self._build_data()
        self._build_model()
        self.stop = StopRequest(self.run_dir / "STOP")
        self.step = 0
        self.samples_offset = 0
        self.last_eval: dict[str, float] | None = None
        self.run_id: str | None = None
        self.tracker = Tracker(self.rank == 0 and cfg.tracking.enabled,
                               resolve_uri(cfg.tracking.uri, cfg.run.dir),
                               cfg.tracking.experiment)

    # ---- construction ---------------------------------------------------------------------
    def _build_data(self) -> None:
        from sessa_pt.data import TokenShardDataset

        c = self.cfg
        self.train_ds = TokenShardDataset(c.data.train, expected_seq_len=c.data.seq_len,
                                          expected_tokenizer_hash=c.data.tokenizer_hash or None,
                                          skip_corrupt=c.data.skip_corrupt,
                                          model_vocab_size=c.model.vocab_size)
        if self.train_ds.vocab_size > c.model.vocab_size:
            raise ValueError(f"the shards' vocabulary has {self.train_ds.vocab_size} tokens but "
                             f"model.vocab_size={c.model.vocab_size}; set model.vocab_size >= "
                             f"{self.train_ds.vocab_size}")
        self.valid_ds = None
        if c.data.valid:
            self.valid_ds = TokenShardDataset(
                c.data.valid, expected_seq_len=c.data.seq_len,
                expected_tokenizer_hash=c.data.tokenizer_hash or self.train_ds_hash(),
                skip_corrupt=c.data.skip_corrupt, model_vocab_size=c.model.vocab_size)

    def train_ds_hash(self) -> str:
        """The train shards' tokenizer hash: validation shards must have been made with it."""
        from sessa_pt.data import read_manifest

        return read_manifest(self.cfg.data.train).tokenizer_sha256

    def _build_model(self) -> None:
        c, lay = self.cfg, self.layout
        ckpt_blocks = c.train.activation_checkpointing == "blocks"
        if lay.pp > 1:
            model = build_pipeline(c.model, c.run.seed, lay, deepspeed_topology(lay),
                                   compile_blocks=c.train.compile, checkpoint_blocks=ckpt_blocks)
            mpu = None   # a PipelineModule carries its own grid (DeepSpeed asserts mpu is None)
        else:
            model = SequentialLM(c.model, c.run.seed, lay, compile_blocks=c.train.compile,
                                 loss_chunk_tokens=c.train.loss_chunk_tokens,
                                 checkpoint_blocks=ckpt_blocks)
            mpu = megatron_mpu()
        self.engine = build_engine(model, c, lay.dp, self.cuda, mpu=mpu)
        from sessa_pt.models.lm import DecoderLM

        with torch.device("meta"):
            plain = DecoderLM(c.model, seed=0)
        self.n_params = plain.num_params()
        self.flops_per_token = plain.flops_per_token(c.data.seq_len)
        self.grad_accum = c.train.global_batch_size // (c.train.micro_batch_size * lay.dp)

    # ---- checkpoints ----------------------------------------------------------------------
    def trainer_state(self) -> dict:
        c = self.cfg
        return {"step": self.step, "consumed_samples": self.consumed_samples(),
                "data_cursor": self.consumed_samples(),
                "global_batch_size": c.train.global_batch_size, "seed": c.run.seed,
                "world_size": self.world, "tp": self.layout.tp, "pp": self.layout.pp,
                "dp": self.layout.dp, "zero_stage": c.parallel.zero_stage,
                "mlflow_run_id": self.run_id, "total_steps": c.train.steps,
                "tokenizer_sha256": self.train_ds_hash()}

    def consumed_samples(self) -> int:
        """The data cursor: samples of all steps so far (steps before a resume with another
        global batch size counted at theirs)."""
        return self.samples_offset + self.step * self.cfg.train.global_batch_size

    def save(self) -> pathlib.Path:
        path = ckpt.save_checkpoint(self.ckpt_root, self.step, self.engine, self.layout,
                                    self.trainer_state(),
                                    yaml.safe_dump(to_dict(self.cfg), sort_keys=False),
                                    self.cfg.checkpoint.keep_last)
        self.log(f"checkpoint saved: {path}")
        return path

    def maybe_resume(self) -> None:
        if not self.cfg.checkpoint.resume:
            return
        state = ckpt.resume(self.ckpt_root, self.engine, self.layout, self.cfg,
                            self.train_ds_hash(), self.log)
        if state is None:
            return
        self.step = int(state["step"])
        self.samples_offset = int(state["consumed_samples"]) - \
            self.step * self.cfg.train.global_batch_size
        self.run_id = state.get("mlflow_run_id")
        path = state["path"]
        self.log(f"resumed from {path} at step {self.step}")

    # ---- logging --------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[sessa_pt] {msg}", flush=True)

    def write_status(self, state: str) -> None:
        if self.rank == 0:
            status = {"state": state, "step": self.step, "total_steps": self.cfg.train.steps,
                      "mlflow_run_id": self.run_id, "tracking_uri": self.tracker.uri}
            tmp = self.run_dir / "status.json.tmp"
            tmp.write_text(json.dumps(status, indent=2))
            os.replace(tmp, self.run_dir / "status.json")

    def _truncate_train_log(self) -> None:
        """Drop log lines of steps after the resumed checkpoint (they will be redone)."""
        path = self.run_dir / "train_log.jsonl"
        if self.rank != 0 or not path.exists():
            return
        keep = [ln for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= self.step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)

    # ---- steps ----------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        dev = device()
        return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}

    def _next(self, batches) -> dict:
        b = next(batches)
        ids = b["sample_ids"]
        self._ids += torch.tensor([float(ids.sum()), float(ids.numel()), float(ids.min())],
                                  dtype=torch.float64)
        return b

    def _sample_checksum(self) -> dict:
        """Sum, count and min of the global batch's sample ids (from the first pipeline stage):
        an exactly-resumed run shows the same numbers at every step."""
        from megatron.core import parallel_state as ps

        ids = self._ids.to(device())
        if self.layout.is_first_stage:
            group = ps.get_data_parallel_group()
            dist.all_reduce(ids[:2], group=group)
            mn = ids[2:].clone()
            dist.all_reduce(mn, op=dist.ReduceOp.MIN, group=group)
            ids[2] = mn[0]
        mn = int(ids[2]) if torch.isfinite(ids[2]) else -1
        return {"sample_id_sum": int(ids[0]), "samples": int(ids[1]), "sample_id_min": mn}

    def train_step(self, batches) -> float:
        e = self.engine
        self._ids = torch.zeros(3, dtype=torch.float64)
        self._ids[2] = float("inf")
        if self.layout.pp > 1:
            def pipe_iter():
                for _ in range(self.grad_accum):
                    b = self._next(batches)
                    yield (b["input_ids"], (b["labels"], b["loss_mask"]))
            return float(e.train_batch(pipe_iter()))
        total = torch.zeros((), device=device())
        self._own_grad_norm = None
        for _ in range(self.grad_accum):
            b = self._to_device(self._next(batches))
            loss = e(b["input_ids"], b["labels"], b["loss_mask"])
            e.backward(loss)
            if e.is_gradient_accumulation_boundary() and self.cfg.parallel.zero_stage == 0:
                self._own_grad_norm = self._grad_norm()
            e.step()
            total += loss.detach().float()
        total /= self.grad_accum
        from megatron.core import parallel_state as ps

        dist.all_reduce(total, group=ps.get_data_parallel_group())
        return float(total) / self.layout.dp

    @torch.no_grad()
    def _grad_norm(self) -> float:
        """Global grad norm of the (DP-averaged) gradients, each TP slice counted once.
        DeepSpeed's engine clips fp32 ZeRO-0 gradients but discards the norm it computed
        (engine.clip_fp32_gradients), so without this the norm would be unknown."""
        from megatron.core import parallel_state as ps

        sq = torch.zeros((), dtype=torch.float64, device=device())
        tp_rank0 = ps.get_tensor_model_parallel_rank() == 0
        for p in self.engine.module.parameters():
            if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank0):
                sq += p.grad.double().pow(2).sum()
        dist.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
        return float(sq.sqrt())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        if self.valid_ds is None:
            return None
        from sessa_pt.data import build_eval_loader

        c, lay, e = self.cfg, self.layout, self.engine
        b = c.train.micro_batch_size
        max_samples = c.eval.max_batches * b * lay.dp if c.eval.max_batches else None
        loader = build_eval_loader(self.valid_ds, b, lay.dp_rank, lay.dp, max_samples)
        if lay.pp > 1:
            batches = iter(loader)
            n_micro = len(loader)
            it = ((x["input_ids"], (x["labels"], x["loss_mask"])) for x in batches)
            loss = float(e.eval_batch(it, num_micro_batches=n_micro))
        else:
            e.eval()
            s = torch.zeros(2, dtype=torch.float64, device=device())
            for batch in loader:
                x = self._to_device(batch)
                n = x["loss_mask"].sum()
                s[0] += e(x["input_ids"], x["labels"], x["loss_mask"]).double() * n
                s[1] += n
            e.train()
            from megatron.core import parallel_state as ps

            dist.all_reduce(s, group=ps.get_data_parallel_group())
            loss = float(s[0] / s[1].clamp_min(1))
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> int:
        c, lay = self.cfg, self.layout
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(c),
                                                                     sort_keys=False))
        dist.barrier()
        self.maybe_resume()
        self._truncate_train_log()
        self.run_id = self.tracker.start(c.run.name or "run", self.run_id) or self.run_id
        self._log_params()
        self.write_status("running")
        self.log(f"{c.run.name}: {self.n_params['total'] / 1e6:.2f}M params "
                 f"({self.n_params['non_embedding'] / 1e6:.2f}M non-embedding), "
                 f"tp={lay.tp} pp={lay.pp} dp={lay.dp} zero={c.parallel.zero_stage} "
                 f"{self.precision}, run dir {self.run_dir}")
        if "mamba2" in c.model.mixers():
            from sessa_pt.models.mamba2 import resolve_ssd_impl

            self.log(f"mamba2 SSD path: {resolve_ssd_impl(c.model.mamba2.impl, device())} "
                     f"(model.mamba2.impl={c.model.mamba2.impl})")
        from sessa_pt.data import build_train_loader

        loader = build_train_loader(self.train_ds, seed=c.run.seed,
                                    global_batch_size=c.train.global_batch_size,
                                    micro_batch_size=c.train.micro_batch_size,
                                    dp_rank=lay.dp_rank, dp_size=lay.dp,
                                    start_cursor=self.consumed_samples(),
                                    num_workers=c.data.num_workers,
                                    context_weight=c.data.context_loss_weight)
        batches = iter(loader)
        tokens_per_step = c.train.global_batch_size * c.data.seq_len
        peak = peak_tflops(c)
        log_path = self.run_dir / "train_log.jsonl"
        state = "finished"
        profiler = StepProfiler(self.run_dir, self.rank)
        while self.step < c.train.steps:
            if self.stop.requested():
                state = "preempted"
                break
            profiler.before_step(self.step + 1)
            t0 = time.perf_counter()
            loss = self.train_step(batches)
            faults.maybe_kill("kill_in_step", self.step + 1)
            if self.cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            self.step += 1
            profiler.after_step(self.step)
            gnorm = self.engine.get_global_grad_norm()
            if gnorm is None:
                gnorm = getattr(self, "_own_grad_norm", None)
            gnorm = float(gnorm) if gnorm is not None else float("nan")
            lr = self.engine.get_lr()[0]
            tps = tokens_per_step / dt
            mfu = 3 * self.flops_per_token * tps / (peak * 1e12 * self.world) if peak else 0.0
            rec = {"step": self.step, "loss": loss, "grad_norm": gnorm, "lr": lr,
                   "tokens_per_s": tps, "mfu": mfu, "memory_gb": memory_gb(),
                   "tokens": self.step * tokens_per_step, **self._sample_checksum()}
            if self.rank == 0:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                if self.step % c.train.log_every == 0 or self.step == c.train.steps:
                    mfu_s = f" | mfu {100 * mfu:.1f}%" if peak else ""
                    print(f"step {self.step}/{c.train.steps} | loss {loss:.4f} | lr {lr:.2e} | "
                          f"gnorm {gnorm:.3f} | {tps / 1e3:.1f}k tok/s{mfu_s} | "
                          f"mem {rec['memory_gb']:.2f}GB", flush=True)
            self.tracker.log_metrics({k: rec[k] for k in ("loss", "grad_norm", "lr", "tokens",
                                                          "tokens_per_s", "mfu", "memory_gb")},
                                     self.step)
            last = self.step == c.train.steps
            if (c.eval.every and self.step % c.eval.every == 0) or last:
                ev = self.evaluate()
                self.last_eval = ev or self.last_eval
                if ev:
                    self.log(f"step {self.step}: val_loss {ev['val_loss']:.4f} "
                             f"val_ppl {ev['val_ppl']:.2f}")
                    self.tracker.log_metrics(ev, self.step)
            if (c.checkpoint.every and self.step % c.checkpoint.every == 0) and not last:
                self.save()
        path = self.save()
        self.write_status(state)
        if self.rank == 0:
            summary = {"state": state, "step": self.step, "checkpoint": str(path.resolve()),
                       "run_dir": str(self.run_dir.resolve()), "mlflow_run_id": self.run_id,
                       "tracking_uri": self.tracker.uri, **(self.last_eval or {})}
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.tracker.log_artifact(self.run_dir / "config.yaml")
            self.tracker.log_artifact(self.run_dir / "summary.json")
            stop_file = self.run_dir / "STOP"
            if state == "preempted" and stop_file.exists():
                stop_file.unlink()
            self.log(f"{state} at step {self.step}; checkpoint {path.resolve()}; mlflow run "
                     f"{self.run_id} in {self.tracker.uri}")
        self.tracker.end("FINISHED" if state == "finished" else "KILLED")
        return 0

    def _log_params(self) -> None:
        c, lay = self.cfg, self.layout
        params = flatten(to_dict(c))
        params.update({"params_total": self.n_params["total"],
                       "params_non_embedding": self.n_params["non_embedding"],
                       "flops_per_token_fwd": self.flops_per_token,
                       "layout.world_size": self.world, "layout.dp": lay.dp,
                       "layout.tp": lay.tp, "layout.pp": lay.pp,
                       "precision": self.precision})
        self.tracker.log_params(params)


def main(recipe: str | None, overrides: list[str]) -> int:
    from sessa_pt.config import ConfigError, load_config
    from sessa_pt.parallel.topology import init_distributed

    try:
        cfg = load_config(recipe, overrides)
    except ConfigError as err:
        print(f"sessa_pt: {err}", file=sys.stderr)
        return 2
    init_distributed()
    try:
        code = Trainer(cfg).run()
    except (ConfigError, ValueError, FileNotFoundError, ckpt.CheckpointError) as err:
        if dist.get_rank() == 0:
            print(f"sessa_pt: error: {err}", file=sys.stderr, flush=True)
        _write_failed(cfg)
        return 2
    dist.barrier()
    return code


def _write_failed(cfg: Config) -> None:
    run_dir = pathlib.Path(cfg.run.dir)
    if dist.get_rank() == 0 and run_dir.exists():
        (run_dir / "status.json").write_text(json.dumps({"state": "failed"}))
