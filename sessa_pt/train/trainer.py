"""The training loop: one process per rank under torchrun.

Builds the layout (megatron parallel_state + DeepSpeed topology), the model (sequential or
pipelined, TP-converted), the DeepSpeed engine, the data loaders; resumes from the newest
complete checkpoint; then runs optimizer steps with logging, validation, checkpoints and
mlflow tracking until ``train.steps`` or a stop request (the file ``<run.dir>/STOP``, SIGTERM,
SIGINT or SIGUSR1 to torchrun or to any worker, or the launcher's death), which saves a
checkpoint at the next step boundary and exits cleanly (status "stopped").

Faults: non-finite steps are skipped and counted (``nonfinite``), a diverged run fails with
advice and keeps its last finite checkpoint; an error on any rank reaches stderr,
``<run.dir>/error.txt`` and status.json (``rundir``); hangs leave stack dumps
(``diagnostics``).
"""

from __future__ import annotations

import math
import pathlib
import sys
import time

import torch
import torch.distributed as dist
import yaml

from sessa_pt.config import Config, ConfigError, check, flatten, resolve_precision, to_dict
from sessa_pt.parallel.engine import build_engine
from sessa_pt.parallel.model import SequentialLM, build_pipeline
from sessa_pt.parallel.topology import (
    ParallelLayout,
    any_rank,
    deepspeed_topology,
    device,
    init_parallel,
    megatron_mpu,
)
from sessa_pt.train import checkpoint as ckpt
from sessa_pt.train import faults
from sessa_pt.train.diagnostics import (
    PhaseTimer,
    StackDumps,
    enable_flight_recorder,
    set_all_group_timeouts,
)
from sessa_pt.train.nonfinite import (
    EXIT_DIVERGED,
    GuardedAdamW,
    NonFiniteError,
    NonFinitePolicy,
    SpikeDetector,
)
from sessa_pt.train.profiling import StepProfiler
from sessa_pt.train.rundir import RunDir, RunDirError, one_line
from sessa_pt.train.signals import (
    ParentWatch,
    StopRequest,
    ignore_stop_signals,
    stop_signals_blocked,
)
from sessa_pt.train.tracking import Tracker, TrackingUnreachable, resolve_uri

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}

# Settings a resume may change (applied from the resumed step on); a changed key outside this
# list (the seed, data, tokenizer, model, precision, global batch size) is refused.
# parallel.* is checked against the checkpoint's layout in maybe_resume.
RESUME_SAFE_PREFIXES = ("optim.", "train.steps", "train.log_every", "train.nonfinite",
                        "train.spike_", "train.micro_batch_size", "train.compile",
                        "train.loss_chunk_tokens", "eval.", "checkpoint.", "tracking.",
                        "run.peak_tflops", "run.overwrite", "run.startup_timeout_s",
                        "run.step_timeout_s", "run.orphan_exit_s", "data.num_workers",
                        "data.skip_corrupt", "parallel.", "train.activation_checkpointing",
                        # how the same math is computed (kernels), not what is computed
                        "model.sessa.impl", "model.sessa.chunk_size", "model.sessa.solve",
                        "model.sessa.panel_mib", "model.mamba2.impl", "model.mamba2.conv_impl")
# Where the run lives is not a setting of the run.
RESUME_IGNORED = ("run.dir", "run.name")
# User errors: a message that says what to change, exit status 2 (anything else: 1).
USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, TrackingUnreachable,
               ckpt.CheckpointError)


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


def config_changes(old: dict, new: dict) -> tuple[dict, list[str]]:
    """(safe changes {key: (old, new)}, refused keys) between two resolved configs."""
    a, b = flatten(old), flatten(new)
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
               if a.get(k) != b.get(k) and k not in RESUME_IGNORED}
    safe_keys = RESUME_SAFE_PREFIXES
    if b.get("checkpoint.allow_batch_size_change"):   # the checkpoint code checks the cursor
        safe_keys = (*safe_keys, "train.global_batch_size")
    safe = {k: v for k, v in changed.items() if k.startswith(safe_keys)}
    return safe, [k for k in changed if k not in safe]


def _find_guarded(engine) -> GuardedAdamW | None:
    """The GuardedAdamW under DeepSpeed's wrappers (the ZeRO and bf16 optimizers hold it as
    ``.optimizer``)."""
    opt = engine.optimizer
    for _ in range(4):
        if isinstance(opt, GuardedAdamW):
            return opt
        opt = getattr(opt, "optimizer", None)
    return None


class Trainer:
    def __init__(self, cfg: Config, stop: StopRequest | None = None,
                 timer: PhaseTimer | None = None, rundir: RunDir | None = None) -> None:
        self.cfg = cfg
        self.cuda = torch.cuda.is_available()
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.timer = timer or PhaseTimer()
        self.step = 0
        self.samples_offset = 0
        self.run_id: str | None = None
        self.tracker: Tracker | None = None
        self.last_eval: dict[str, float] | None = None
        self.nonfinite = NonFinitePolicy(cfg.train.nonfinite, cfg.train.nonfinite_max_consecutive)
        self.spikes = SpikeDetector(cfg.train.spike_factor, cfg.train.spike_window)
        check(cfg, self.world, self.cuda)
        self.precision = resolve_precision(cfg, self.cuda)
        self.run_dir = pathlib.Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.rundir = rundir or RunDir(self.run_dir, self.rank)
        with self.timer.phase("run dir + tracking probe"):
            self.resume_changes = self._prepare()
        self.stop = stop or StopRequest(self.run_dir / "STOP")
        with self.timer.phase("process groups"):
            self.layout: ParallelLayout = init_parallel(cfg.parallel.tp, cfg.parallel.pp,
                                                        cfg.run.seed)
        with self.timer.phase("data"):
            self._build_data()
        with self.timer.phase("model + engine"):
            self._build_model()

    # ---- construction ---------------------------------------------------------------------
    def _prepare(self) -> dict:
        """Collective. Rank 0 claims the run dir (lock, overwrite), compares a resumed
        checkpoint's config with this one and probes the tracking server; every rank gets the
        same outcome (an error is raised on all of them). Returns the safe setting changes."""
        c = self.cfg
        outcome: list = [None]
        if self.rank == 0:
            try:
                latest = ckpt.latest_checkpoint(self.ckpt_root)
                notes = self.rundir.prepare(c.checkpoint.resume, c.run.overwrite,
                                            latest is not None)
                changes: dict = {}
                if c.checkpoint.resume and latest is not None:
                    old = yaml.safe_load((latest / "config.yaml").read_text())
                    changes, refused = config_changes(old, to_dict(c))
                    if refused:
                        a, b = flatten(old), flatten(to_dict(c))
                        detail = ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})"
                                           for k in refused)
                        raise RunDirError(
                            f"{latest} was trained with settings that cannot change on resume: "
                            f"{detail}. The seed, data, tokenizer, model, precision and global "
                            "batch size define the run: resume with the values in "
                            f"{latest / 'config.yaml'}, or start a new run.dir")
                self.rundir.clear_error()
                self.tracker = Tracker(c.tracking.enabled,
                                       resolve_uri(c.tracking.uri, c.run.dir),
                                       c.tracking.experiment, c.tracking.probe_timeout_s,
                                       c.tracking.flush_timeout_s)
                outcome = [("ok", notes, changes)]
            except Exception as err:  # noqa: BLE001 (re-raised on every rank below)
                self.rundir.release_lock()
                outcome = [("error", type(err).__name__, str(err))]
        if self.world > 1:
            dist.broadcast_object_list(outcome, src=0)
        if outcome[0][0] == "error":
            _, name, msg = outcome[0]
            cls = {"RunDirError": RunDirError, "TrackingUnreachable": TrackingUnreachable,
                   "ConfigError": ConfigError}.get(name, ValueError)
            raise cls(msg)
        _, notes, changes = outcome[0]
        if self.rank != 0:
            self.tracker = Tracker(False, resolve_uri(c.tracking.uri, c.run.dir),
                                   c.tracking.experiment)
        self.rundir.ours = True       # this run holds the lock: failures may be written here
        for note in notes:
            self.log(f"warning: {note}")
        return changes

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

    def train_ds_manifest(self):
        from sessa_pt.data import read_manifest

        return read_manifest(self.cfg.data.train)

    def train_ds_hash(self) -> str:
        """The train shards' tokenizer hash: validation shards must have been made with it."""
        return self.train_ds_manifest().tokenizer_sha256

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
        self.engine = build_engine(model, c, lay.dp, self.cuda, mpu=mpu,
                                   optimizer_class=GuardedAdamW)
        self.optimizer = _find_guarded(self.engine)
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

    def _params_finite(self) -> bool:
        """Collective: every rank's parameters are finite."""
        ok = all(bool(torch.isfinite(p).all()) for p in self.engine.module.parameters()
                 if p.numel())
        return not any_rank(not ok)

    def save(self) -> pathlib.Path | None:
        """Collective. Never writes a checkpoint after a non-finite step or of non-finite
        weights (the newest checkpoint on disk stays the newest finite one)."""
        if self.nonfinite.last_bad or not self._params_finite():
            self.log(f"step {self.step}: not saving a checkpoint: the step or the weights are "
                     f"non-finite; the newest checkpoint stays "
                     f"{ckpt.latest_checkpoint(self.ckpt_root)}")
            return None
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
        self._apply_optimizer_settings()
        self.log(f"resumed from {path} at step {self.step}")
        if self.resume_changes:
            self.log("settings changed on resume (applied from step "
                     f"{self.step + 1}): " + "; ".join(
                         f"{k}: {a} -> {b}" for k, (a, b) in self.resume_changes.items()))

    def _apply_optimizer_settings(self) -> None:
        """The loaded optimizer and LR-scheduler states carry the old run's lr, betas, eps and
        weight decay: put this config's values back. The schedule's shape (warmup, decay,
        train.steps) comes from this config already (LambdaLR does not save its function)."""
        opt, sched, o = self.optimizer, self.engine.lr_scheduler, self.cfg.optim
        if opt is None or sched is None:
            return
        for i, g in enumerate(opt.param_groups):
            g["betas"], g["eps"], g["initial_lr"] = (o.beta1, o.beta2), o.eps, o.lr
            g["weight_decay"] = o.weight_decay if i == 0 else 0.0    # [decay, no_decay]
        sched.base_lrs = [o.lr] * len(opt.param_groups)
        for g, lam in zip(opt.param_groups, sched.lr_lambdas):
            g["lr"] = o.lr * lam(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in opt.param_groups]

    # ---- logging --------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[sessa_pt] {msg}", flush=True)

    def status_fields(self) -> dict:
        return {"step": self.step, "total_steps": self.cfg.train.steps,
                "mlflow_run_id": self.run_id,
                "tracking_uri": self.tracker.uri if self.tracker else None,
                "nonfinite_steps": self.nonfinite.total if hasattr(self, "nonfinite") else 0}

    # ---- steps ----------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        dev = device()
        return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}

    def _next(self, batches) -> dict:
        b = next(batches)
        ids = b["sample_ids"]
        self._id_list.append(ids.flatten())
        self._ids += torch.tensor([float(ids.sum()), float(ids.numel()), float(ids.min())],
                                  dtype=torch.float64)
        return b

    def _sample_checksum(self) -> dict:
        """Sum, count and min of the global batch's sample ids (from the first pipeline stage):
        an exactly-resumed run shows the same numbers at every step."""
        from megatron.core import parallel_state as ps

        # one data-parallel rank: the sums are this rank's, read where they were made
        ids = self._ids if self.layout.dp == 1 else self._ids.to(device())
        if self.layout.is_first_stage and self.layout.dp > 1:
            group = ps.get_data_parallel_group()
            dist.all_reduce(ids[:2], group=group)
            mn = ids[2:].clone()
            dist.all_reduce(mn, op=dist.ReduceOp.MIN, group=group)
            ids[2] = mn[0]
        mn = int(ids[2]) if torch.isfinite(ids[2]) else -1
        return {"sample_id_sum": int(ids[0]), "samples": int(ids[1]), "sample_id_min": mn}

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

    def train_step(self, batches) -> float:
        e = self.engine
        self._ids = torch.zeros(3, dtype=torch.float64)
        self._ids[2] = float("inf")
        self._id_list: list[torch.Tensor] = []
        if self.optimizer is not None:
            self.optimizer.begin_step()
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
            loss = faults.corrupt_loss(e(b["input_ids"], b["labels"], b["loss_mask"]),
                                       self.step + 1)
            e.backward(loss)
            total += loss.detach().float()
            if e.is_gradient_accumulation_boundary():
                if self.optimizer is not None and not bool(torch.isfinite(total)):
                    self.optimizer.mark_loss_nonfinite()
                if self.cfg.parallel.zero_stage == 0:
                    self._own_grad_norm = self._grad_norm()
            e.step()
        total /= self.grad_accum
        if self.layout.dp > 1:
            from megatron.core import parallel_state as ps

            dist.all_reduce(total, group=ps.get_data_parallel_group())
        return float(total) / self.layout.dp

    def _step_nonfinite(self, loss: float, gnorm: float) -> bool:
        """Collective: one flag, true on every rank when any rank saw a non-finite loss, grad
        norm or a skipped update."""
        skipped = bool(self.optimizer is not None and self.optimizer.skipped)
        bad = skipped or not math.isfinite(loss) or not math.isfinite(gnorm)
        return any_rank(bad)

    def _batch_sample_ids(self) -> list[int]:
        """Collective: the sorted sample ids of this step's global batch."""
        mine = torch.cat(self._id_list).tolist() if self._id_list else []
        parts = [None] * self.world
        dist.all_gather_object(parts, mine)
        return sorted({int(i) for part in parts for i in part})

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Token-weighted validation loss (sum of token losses / number of target tokens) on
        every layout, so the value does not depend on how the set is split into micro-batches
        and ranks."""
        if self.valid_ds is None:
            return None
        from megatron.core import parallel_state as ps

        from sessa_pt.data import build_eval_loader

        c, lay, e = self.cfg, self.layout, self.engine
        b = c.train.micro_batch_size
        max_samples = c.eval.max_batches * b * lay.dp if c.eval.max_batches else None
        loader = build_eval_loader(self.valid_ds, b, lay.dp_rank, lay.dp, max_samples)
        if lay.pp > 1:
            micro = list(loader)
            tokens = torch.tensor([float(sum(float(x["loss_mask"].sum()) for x in micro))],
                                  dtype=torch.float64, device=device())
            dist.all_reduce(tokens, group=ps.get_data_parallel_group())
            it = ((x["input_ids"], (x["labels"], x["loss_mask"],
                                    x["loss_mask"].sum().float()))
                  for x in micro)
            # DeepSpeed averages the per-micro-batch outputs (here: token-loss sums) over the
            # micro-batches and the data-parallel ranks; undo the average, divide by tokens.
            mean_of_sums = float(e.eval_batch(it, num_micro_batches=len(micro)))
            loss = mean_of_sums * len(micro) * lay.dp / max(float(tokens[0]), 1.0)
        else:
            e.eval()
            s = torch.zeros(2, dtype=torch.float64, device=device())
            for batch in loader:
                x = self._to_device(batch)
                n = x["loss_mask"].sum()
                s[0] += e(x["input_ids"], x["labels"], x["loss_mask"]).double() * n
                s[1] += n
            e.train()
            dist.all_reduce(s, group=ps.get_data_parallel_group())
            loss = float(s[0] / s[1].clamp_min(1))
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> int:
        c, lay = self.cfg, self.layout
        self.rundir.write_config(to_dict(c), keep_previous=bool(self.resume_changes))
        dist.barrier()
        with self.timer.phase("resume"):
            self.maybe_resume()
        self.rundir.truncate_log(self.step)
        self.run_id = self.tracker.start(c.run.name or "run", self.run_id) or self.run_id
        self._log_params()
        self.tracker.log_config_change(self.step, self.resume_changes)
        if c.tracking.system_metrics:
            self.tracker.start_system_metrics(c.tracking.system_metrics_interval_s)
        self.tracker.log_artifact(self.run_dir / "config.yaml")
        tok = self.train_ds_manifest().tokenizer.get("path")
        if tok:
            self.tracker.log_artifact(tok, "tokenizer")
        self.rundir.write_status("running", **self.status_fields())
        self.log(f"{c.run.name}: {self.n_params['total'] / 1e6:.2f}M params "
                 f"({self.n_params['non_embedding'] / 1e6:.2f}M non-embedding), "
                 f"tp={lay.tp} pp={lay.pp} dp={lay.dp} zero={c.parallel.zero_stage} "
                 f"{self.precision}, run dir {self.run_dir}")
        if "mamba2" in c.model.mixers():
            from sessa_pt.models.mamba2 import resolve_ssd_impl

            self.log(f"mamba2 SSD path: {resolve_ssd_impl(c.model.mamba2.impl, device())} "
                     f"(model.mamba2.impl={c.model.mamba2.impl})")
        from sessa_pt.data import build_train_loader

        with self.timer.phase("first batch"):
            loader = build_train_loader(self.train_ds, seed=c.run.seed,
                                        global_batch_size=c.train.global_batch_size,
                                        micro_batch_size=c.train.micro_batch_size,
                                        dp_rank=lay.dp_rank, dp_size=lay.dp,
                                        start_cursor=self.consumed_samples(),
                                        num_workers=c.data.num_workers,
                                        worker_init_fn=ignore_stop_signals,
                                        context_weight=c.data.context_loss_weight)
            batches = _Prefetched(iter(loader))
        self.log(self.timer.summary())
        set_all_group_timeouts(c.run.step_timeout_s)
        stacks = StackDumps(self.run_dir, self.rank, c.run.step_timeout_s)
        tokens_per_step = c.train.global_batch_size * c.data.seq_len
        peak = peak_tflops(c)
        state = "finished"
        profiler = StepProfiler(self.run_dir, self.rank)
        try:
            while self.step < c.train.steps:
                if self.stop.requested():
                    state = "stopped"
                    break
                stacks.arm()
                profiler.before_step(self.step + 1)
                t0 = time.perf_counter()
                faults.maybe_fail("raise_in_step", self.step + 1)
                faults.maybe_hang("hang_in_step", self.step + 1)
                loss = self.train_step(batches)
                faults.maybe_kill("kill_in_step", self.step + 1)
                if self.cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                self.step += 1
                profiler.after_step(self.step)
                self._after_step(loss, dt, tokens_per_step, peak)
                stacks.disarm()
                if self.nonfinite.should_abort():
                    raise NonFiniteError(self.nonfinite.abort_message(
                        self.step, self.engine.get_lr()[0]))
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
            if state == "stopped":
                if self.stop.reason:          # the rank(s) that got the request say why
                    print(f"[sessa_pt] rank {self.rank}: stop requested ({self.stop.reason})",
                          flush=True)
                self.log(f"stopping: saving a checkpoint at step {self.step}, then exiting")
            path = self.save() or ckpt.latest_checkpoint(self.ckpt_root)
        finally:
            stacks.close()
        self.rundir.write_status(state, **self.status_fields())
        if self.rank == 0:
            summary = {"state": state, "step": self.step,
                       "checkpoint": str(path.resolve()) if path else None,
                       "run_dir": str(self.run_dir.resolve()), "mlflow_run_id": self.run_id,
                       "tracking_uri": self.tracker.uri, "nonfinite_steps": self.nonfinite.total,
                       **(self.last_eval or {})}
            self.rundir.write_summary(summary)
            self.tracker.log_artifact(self.run_dir / "summary.json")
            stop_file = self.run_dir / "STOP"
            if state == "stopped" and stop_file.exists():
                stop_file.unlink()
            self.log(f"{state} at step {self.step}; checkpoint {summary['checkpoint']}; mlflow "
                     f"run {self.run_id} in {self.tracker.uri}")
        self.tracker.end("FINISHED" if state == "finished" else "KILLED")
        self.rundir.release_lock()
        return 0

    def _after_step(self, loss: float, dt: float, tokens_per_step: int, peak: float) -> None:
        c = self.cfg
        raw = self.engine.get_global_grad_norm()
        if raw is None:
            raw = getattr(self, "_own_grad_norm", None)
        # Unknown on some layouts (pp > 1 without clipping): logged as null, and not a reason
        # to call the step non-finite (GuardedAdamW still checks the gradients themselves).
        gnorm = float(raw) if raw is not None else float("nan")
        bad = self._step_nonfinite(loss, gnorm if raw is not None else 0.0)
        self.nonfinite.update(self.step, bad)
        lr = self.engine.get_lr()[0]
        tps = tokens_per_step / dt
        mfu = 3 * self.flops_per_token * tps / (peak * 1e12 * self.world) if peak else 0.0
        rec = {"step": self.step, "loss": loss, "grad_norm": gnorm, "lr": lr,
               "tokens_per_s": tps, "mfu": mfu, "memory_gb": memory_gb(),
               "tokens": self.step * tokens_per_step, "nonfinite": bad,
               "nonfinite_steps": self.nonfinite.total, **self._sample_checksum()}
        self.rundir.append_log(rec)
        if self.rank == 0 and (self.step % c.train.log_every == 0 or self.step == c.train.steps
                               or bad):
            mfu_s = f" | mfu {100 * mfu:.1f}%" if peak else ""
            bad_s = (f" | NON-FINITE, update skipped ({self.nonfinite.consecutive} in a row, "
                     f"{self.nonfinite.total} in all)") if bad else ""
            print(f"step {self.step}/{c.train.steps} | loss {loss:.4f} | lr {lr:.2e} | "
                  f"gnorm {gnorm:.3f} | {tps / 1e3:.1f}k tok/s{mfu_s} | "
                  f"mem {rec['memory_gb']:.2f}GB{bad_s}", flush=True)
        metrics = {k: rec[k] for k in ("loss", "grad_norm", "lr", "tokens", "tokens_per_s", "mfu",
                                       "memory_gb", "nonfinite_steps")}
        # mlflow stores NaN, but a chart of it is empty: non-finite steps are the counter.
        self.tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)},
                                 self.step)
        mean = self.spikes.check(loss)
        if mean is not None:          # every rank sees the same loss, so all gather the ids
            ids = self._batch_sample_ids()
            self.rundir.append_spike({"step": self.step, "loss": loss, "running_mean": mean,
                                      "sample_ids": ids})
            self.log(f"loss spike at step {self.step}: loss {loss:.4f} > "
                     f"{c.train.spike_factor:g} x running mean {mean:.4f}; the batch's "
                     f"{len(ids)} sample ids are in {self.run_dir / 'spikes.jsonl'}: "
                     f"{ids[:16]}{' ...' if len(ids) > 16 else ''}")
            self.tracker.log_metrics({"loss_spike": loss}, self.step)

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


class _Prefetched:
    """The train loader's iterator with its first batch taken while the stop signals are
    blocked: the DataLoader workers fork then, and inherit the block (see signals.py)."""

    def __init__(self, it) -> None:
        self.it = it
        with stop_signals_blocked():
            self.first = [next(it)]

    def __iter__(self):
        return self

    def __next__(self):
        return self.first.pop() if self.first else next(self.it)


def main(recipe: str | None, overrides: list[str], imports_s: float = 0.0) -> int:
    from sessa_pt.config import load_config
    from sessa_pt.parallel.topology import init_distributed

    try:
        cfg = load_config(recipe, overrides)
    except ConfigError as err:
        print(f"sessa_pt: {err}", file=sys.stderr)
        return 2
    stop = StopRequest(pathlib.Path(cfg.run.dir) / "STOP")
    ParentWatch(stop, cfg.run.orphan_exit_s).start()
    timer = PhaseTimer()
    timer.add("imports", imports_s)
    enable_flight_recorder(cfg.run.dir)
    with timer.phase("rendezvous"):
        init_distributed(timeout_minutes=cfg.run.startup_timeout_s / 60)
    trainer = None
    # Made here so that a failure while the Trainer is built still knows the run dir is ours.
    rundir = RunDir(cfg.run.dir, dist.get_rank())
    try:
        trainer = Trainer(cfg, stop, timer, rundir)
        code = trainer.run()
    except BaseException as err:  # noqa: BLE001 (every failure is reported, then exits)
        return report_failure(trainer, rundir, err)
    dist.barrier()
    return code


def report_failure(trainer: Trainer | None, rundir: RunDir, err: BaseException) -> int:
    """Every failing rank prints its error to its own stderr (torchrun may kill rank 0 before
    it could speak for the others); the first to fail also writes ``<run.dir>/error.txt`` and
    marks status.json failed. Returns the exit status."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    step = trainer.step if trainer is not None else None
    user = isinstance(err, USER_ERRORS) and not isinstance(err, NonFiniteError)
    where = f" after step {step}" if step else ""
    if user:
        text = f"sessa_pt: error (rank {rank}{where}): {err}"
    else:
        import traceback

        tb = "".join(traceback.format_exception(err)[-8:])
        text = f"sessa_pt: rank {rank} failed{where}: {one_line(err)}\n{tb}"
    print(text, file=sys.stderr, flush=True)
    fields = trainer.status_fields() if trainer is not None else {}
    # A run dir held by another live run is not ours to mark failed.
    if rundir.ours or rundir.live_owner() is None:
        first = rundir.record_error(rank, err, step, fields)
        if rank == 0 and trainer is not None:
            try:
                rundir.write_summary({"state": "failed", "step": step, "error": one_line(err),
                                      "first_failing_rank": rank if first else None,
                                      "checkpoint": str(ckpt.latest_checkpoint(
                                          trainer.ckpt_root) or "") or None,
                                      "run_dir": str(rundir.path.resolve()),
                                      "mlflow_run_id": trainer.run_id,
                                      **fields, **(trainer.last_eval or {})})
            except (OSError, AttributeError):
                pass
    if trainer is not None and trainer.tracker is not None:
        try:
            trainer.tracker.end("FAILED")
        except Exception as end_err:  # noqa: BLE001 (the run's own error is the one to report)
            print(f"sessa_pt: rank {rank}: could not close the mlflow run: {end_err}",
                  file=sys.stderr, flush=True)
    rundir.release_lock()
    if isinstance(err, NonFiniteError):
        return EXIT_DIVERGED
    return 2 if user else 1
