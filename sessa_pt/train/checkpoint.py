"""Atomic, verified, layout-free checkpoints.

Layout of ``<run.dir>/checkpoints/step_XXXXXXXX/``:
  model/rank_NNNNN.safetensors  the plain DecoderLM's fp32 weights (full shapes, plain names),
                                each tensor in exactly one file; together: the whole model,
                                loadable for evaluation and export whatever layout trained it
  optim/rank_NNNNN.safetensors  AdamW's exp_avg.<name> / exp_avg_sq.<name>, same shapes
  rng/rank_NNNNN.pt             python, numpy, torch (and CUDA) RNG states of every rank
  trainer_state.json            step, data cursor, layout, optimizer step, LR scheduler state,
                                seed, tokenizer hash, mlflow run id
  config.yaml, versions.json    the resolved run config, package versions
  MANIFEST.json                 size and sha256 of every file above, and which file holds
                                which tensor
  COMPLETE                      written last; a directory without it is ignored

Why this format and not DeepSpeed's (universal) checkpoints, and who writes what:
:mod:`sessa_pt.train.ckpt_state`. A checkpoint resumes on any tp / pp / dp / ZeRO stage.

Writes go to ``step_XXXXXXXX.tmp``; once every rank's files are on disk rank 0 writes the
manifest, renames the directory and writes COMPLETE. A run killed mid-save leaves only a
``.tmp`` directory, which the next save removes; a failed write (disk full) removes it at once.
On resume the newest complete checkpoint is verified against its manifest (each rank checks a
share of the files); a damaged one is renamed ``step_XXXXXXXX.damaged`` (kept for inspection)
and the previous complete one is used, with a warning naming the damaged files.
"""

from __future__ import annotations

import io
import json
import pathlib
import random
import re
import shutil
from importlib import metadata

import numpy as np
import torch
import torch.distributed as dist

from sessa_pt.train.ckpt_files import (
    MANIFEST,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointWriteError,
    fsync_dir,
    read_manifest,
    verify_checkpoint,
    verify_files,
    write_error,
    write_file,
    write_json,
)

__all__ = ["CheckpointCorrupt", "CheckpointError", "CheckpointWriteError", "complete_checkpoints",
           "latest_checkpoint", "load_plain_model", "resume", "save_checkpoint",
           "write_model_checkpoint"]

STEP_DIR = re.compile(r"^step_(\d{8})$")
FORMAT = 2                 # 1: DeepSpeed engine files + model.pt (no manifest)
# Model settings that change how the model computes, not what it is: may differ on resume.
COMPUTE_ONLY = ("impl", "chunk_size")


def step_dir(root: pathlib.Path, step: int) -> pathlib.Path:
    return root / f"step_{step:08d}"


def step_of(path: pathlib.Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def complete_checkpoints(root: pathlib.Path) -> list[pathlib.Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(root: pathlib.Path) -> pathlib.Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "deepspeed", "megatron-core", "sentencepiece", "webdataset", "mlflow",
                 "mlflow-skinny", "numpy", "triton", "safetensors", "sessa_pt"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def reseed_rng(seed: int, step: int, rank: int) -> None:
    """The RNG policy on a layout change: per-rank streams cannot be carried to other ranks, so
    every rank's python / numpy / torch RNG restarts from (run.seed, step, rank). (Training draws
    nothing from them today: the data order is a function of the sample index.)"""
    s = (seed * 1_000_003 + step) * 4099 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _agree(error: str | None) -> str | None:
    """Collective: the first rank's error message (or None when no rank failed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def _fail_save(tmp: pathlib.Path, error: str) -> None:
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    raise CheckpointWriteError(error)


def rotate(root: pathlib.Path, newest: int, keep_last: int) -> list[pathlib.Path]:
    """Delete complete checkpoints older than step ``newest`` beyond the newest ``keep_last``
    (``newest`` included). Never the newest one, and never one of a higher step (which a new run
    in an old directory must not remove). Returns what was deleted."""
    if keep_last <= 0:
        return []
    older = [p for p in complete_checkpoints(root) if step_of(p) < newest]
    doomed = older[:max(0, len(older) - (keep_last - 1))]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def save_checkpoint(root: pathlib.Path, step: int, engine, layout, trainer_state: dict,
                    config_yaml: str, keep_last: int) -> pathlib.Path:
    """Collective: every rank calls it and writes its own share. Returns the final directory.
    Raises CheckpointWriteError (on every rank) when a file cannot be written; the partial
    directory is removed and older checkpoints are untouched."""
    from safetensors.torch import save as safetensors_bytes

    from sessa_pt.train import ckpt_state
    from sessa_pt.train.faults import maybe_kill

    rank = dist.get_rank()
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob("step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():      # same step again (killed renaming, or a damaged one)
                shutil.rmtree(final)
            for sub in ("rng", "model", "optim"):
                (tmp / sub).mkdir(parents=True)
        except OSError as err:
            error = str(write_error(tmp, err))
    if error := _agree(error):
        _fail_save(tmp, error)
    model_t, optim_t = ckpt_state.collect(engine, layout)
    files: dict[str, dict] = {}
    tensors: dict[str, dict[str, str]] = {"model": {}, "optim": {}}
    name = f"rank_{rank:05d}"
    try:
        files[f"rng/{name}.pt"] = write_file(tmp / "rng" / f"{name}.pt", _torch_bytes(rng_state()))
        for kind, part in (("model", model_t), ("optim", optim_t)):
            if part:
                rel = f"{kind}/{name}.safetensors"
                files[rel] = write_file(tmp / rel, safetensors_bytes(part))
                tensors[kind].update({k: rel for k in part})
        if rank == 0:
            state = dict(trainer_state, format=FORMAT,
                         optimizer_step=ckpt_state.optimizer_step(engine),
                         scheduler=engine.lr_scheduler.state_dict(),
                         zero3_partitioned_params=ckpt_state.zero3_partitioned(engine),
                         engine_counters={"global_steps": engine.global_steps,
                                          "global_samples": engine.global_samples,
                                          "skipped_steps": engine.skipped_steps})
            files["trainer_state.json"] = write_json(tmp / "trainer_state.json", state)
            files["config.yaml"] = write_file(tmp / "config.yaml", config_yaml.encode())
            files["versions.json"] = write_json(tmp / "versions.json", package_versions())
    except CheckpointWriteError as err:
        error = str(err)
    if error := _agree(error):
        _fail_save(tmp, error)
    parts = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object((files, tensors), parts, dst=0)
    if rank == 0:
        try:
            manifest = {"format": FORMAT, "step": step, "files": {}, "tensors": {"model": {},
                                                                             "optim": {}}}
            for f, t in parts:
                manifest["files"].update(f)
                for kind in t:
                    manifest["tensors"][kind].update(t[kind])
            write_json(tmp / MANIFEST, manifest)
        except CheckpointWriteError as err:
            error = str(err)
    if error := _agree(error):
        _fail_save(tmp, error)
    maybe_kill("kill_in_save", step)
    if rank == 0:
        try:
            tmp.rename(final)
            write_file(final / "COMPLETE", f"step {step}\n".encode())
            fsync_dir(root)
        except (OSError, CheckpointWriteError) as err:
            error = str(err if isinstance(err, CheckpointWriteError) else write_error(final, err))
            shutil.rmtree(final, ignore_errors=True)
    if error := _agree(error):
        _fail_save(tmp, error)
    if rank == 0:
        rotate(root, step, keep_last)
    dist.barrier()
    return final


# ---- resuming --------------------------------------------------------------------------------

def _verify_shared(path: pathlib.Path) -> list[str]:
    """Collective: every rank checks every world_size-th file of the manifest; all problems."""
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        manifest = read_manifest(path)
        names = sorted(manifest["files"])[rank::world]
        problems = verify_files(path, manifest, names)
    except CheckpointCorrupt as err:
        problems = err.problems
    gathered = [None] * world
    dist.all_gather_object(gathered, problems)
    return sorted({p for ps in gathered for p in ps})


def _changed_model(saved: dict, now: dict, prefix: str = "model") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_model(a, b, f"{prefix}.{key}")
        elif a != b and key not in COMPUTE_ONLY:
            out.append(f"{prefix}.{key}: {a} -> {b}")
    return out


def check_compatible(path: pathlib.Path, state: dict, cfg, tokenizer_sha256: str | None) -> None:
    """Refuse, with what to change, a resume that cannot carry the run over."""
    import yaml

    from sessa_pt.config import to_dict

    saved_cfg = yaml.safe_load((path / "config.yaml").read_text())
    changed = _changed_model(saved_cfg.get("model", {}), to_dict(cfg)["model"])
    if changed:
        raise ValueError(f"{path} was trained with another model ({'; '.join(changed)}): resume "
                         f"with the model settings it was written with ({path / 'config.yaml'}) "
                         "or use a new run.dir")
    if state["seed"] != cfg.run.seed:
        raise ValueError(f"{path} was trained with run.seed={state['seed']} (this run: "
                         f"{cfg.run.seed}); the seed fixes the data order: resume with the same "
                         "seed or use a new run.dir")
    old_tok = state.get("tokenizer_sha256")
    if old_tok and tokenizer_sha256 and old_tok != tokenizer_sha256:
        raise ValueError(f"{path} was trained on shards of another tokenizer (sha256 "
                         f"{old_tok[:12]}..., these shards: {tokenizer_sha256[:12]}...): resume "
                         "with the data it was trained on or use a new run.dir")
    gbs, consumed = cfg.train.global_batch_size, int(state["consumed_samples"])
    if state["global_batch_size"] != gbs:
        if not cfg.checkpoint.allow_batch_size_change:
            raise ValueError(f"{path} was trained with train.global_batch_size="
                             f"{state['global_batch_size']} (this run: {gbs}); resume with the "
                             "same value, or set checkpoint.allow_batch_size_change=true to "
                             "change it (the data order continues at the same sample; the LR "
                             "schedule counts optimizer steps)")
        if consumed % gbs:
            raise ValueError(f"{path} has consumed {consumed} samples, not a multiple of "
                             f"train.global_batch_size={gbs}: choose a divisor of {consumed}")


def find_resumable(root: pathlib.Path, log) -> pathlib.Path | None:
    """Collective: the newest complete checkpoint that matches its manifest. Damaged ones are
    renamed ``*.damaged`` with a warning; if every checkpoint is damaged, CheckpointCorrupt."""
    found = complete_checkpoints(root)
    damaged = []
    for path in reversed(found):
        problems = _verify_shared(path)
        if not problems:
            return path
        damaged.append(f"{path.name}: {'; '.join(problems)}")
        log(f"WARNING: checkpoint {path} is damaged ({'; '.join(problems)}); it is kept as "
            f"{path.name}.damaged and the previous complete checkpoint is used")
        dist.barrier()
        if dist.get_rank() == 0:
            path.rename(path.with_name(path.name + ".damaged"))
        dist.barrier()
    if damaged:
        advice = "no intact checkpoint is left: move the checkpoints directory aside to start over"
        raise CheckpointCorrupt(root, [*damaged, advice])
    return None


def _layout_str(tp, pp, dp, zero) -> str:
    return f"tp={tp} pp={pp} dp={dp} zero={zero}"


class _Reader:
    """Tensors of a checkpoint by name, opening each safetensors file once."""

    def __init__(self, path: pathlib.Path, index: dict[str, dict[str, str]]) -> None:
        self.path, self.index, self.handles = path, index, {}

    def __call__(self, kind: str, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        missing = [n for n in names if n not in self.index[kind]]
        if missing:
            raise ValueError(f"{self.path} does not fit this run's model: it holds no {kind} "
                             f"tensors {missing[:8]}")
        out = {}
        for n in names:
            rel = self.index[kind][n]
            if rel not in self.handles:
                self.handles[rel] = safe_open(str(self.path / rel), framework="pt")
            out[n] = self.handles[rel].get_tensor(n)
        return out


def load_checkpoint(path: pathlib.Path, engine, layout, cfg) -> dict:
    """Restore weights, fp32 masters, Adam moments and step, the LR scheduler, DeepSpeed's step
    counters and the RNG from a verified checkpoint onto this run's layout; returns
    trainer_state with ``layout_change`` (None when the layout is the same)."""
    from sessa_pt.train import ckpt_state

    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is in checkpoint format {state.get('format', 1)}; this "
                              f"sessa_pt reads format {FORMAT}")
    manifest = read_manifest(path)
    ckpt_state.restore(engine, layout, cfg.model, cfg.run.seed,
                       _Reader(path, manifest["tensors"]))
    ckpt_state.set_optimizer_step(engine, int(state["optimizer_step"]))
    sched = engine.lr_scheduler
    sched.load_state_dict(state["scheduler"])
    for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
        group["lr"] = lr
    for k, v in state.get("engine_counters", {}).items():
        setattr(engine, k, v)
    before = (state["tp"], state["pp"], state["dp"], state["zero_stage"])
    now = (layout.tp, layout.pp, layout.dp, cfg.parallel.zero_stage)
    same_ranks = before[:3] == now[:3]
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if same_ranks and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        reseed_rng(cfg.run.seed, int(state["step"]), dist.get_rank())
    state["rng_restored"] = same_ranks and rng_file.is_file()
    state["layout_change"] = None if before == now else \
        f"layout {_layout_str(*before)} -> {_layout_str(*now)}"
    return state


def resume(root: pathlib.Path, engine, layout, cfg, tokenizer_sha256: str | None,
           log) -> dict | None:
    """Collective: load the newest intact checkpoint under ``root`` (None when there is none);
    returns its trainer_state (plus ``path`` and ``layout_change``)."""
    path = find_resumable(root, log)
    if path is None:
        return None
    state = json.loads((path / "trainer_state.json").read_text())
    check_compatible(path, state, cfg, tokenizer_sha256)
    state = load_checkpoint(path, engine, layout, cfg)
    state["path"] = path
    if state["layout_change"]:
        rng = "" if state["rng_restored"] else \
            "; RNG streams re-seeded per rank from run.seed, step and rank"
        log(f"{state['layout_change']}{rng}")
    return state


# ---- the plain model (evaluation, export) ----------------------------------------------------

def read_plain_state(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """The plain DecoderLM state dict of a checkpoint directory, after verifying the model files
    and metadata against the manifest (CheckpointCorrupt names any damaged file)."""
    from safetensors.torch import load_file

    verify_checkpoint(path, only="model")
    manifest = read_manifest(path)
    out: dict[str, torch.Tensor] = {}
    for rel in sorted(set(manifest["tensors"]["model"].values())):
        out.update(load_file(str(path / rel)))
    return out


def load_plain_model(path: str | pathlib.Path):
    """A DecoderLM from a checkpoint directory (or a run directory: its newest checkpoint),
    whatever parallel layout trained it, verified against its manifest. Returns
    (model, Config)."""
    from sessa_pt.config import load_config
    from sessa_pt.models.lm import DecoderLM

    path = pathlib.Path(path)
    if not (path / "COMPLETE").is_file():
        newest = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"{path} is neither a complete checkpoint (no COMPLETE "
                                    "marker) nor a run directory with one")
        path = newest
    state = read_plain_state(path)
    cfg = load_config(path / "config.yaml")
    model = DecoderLM(cfg.model, seed=cfg.run.seed)
    model.load_state_dict(state, strict=True)
    return model, cfg


def write_model_checkpoint(path: pathlib.Path, state_dict: dict[str, torch.Tensor],
                           config_yaml: str, trainer_state: dict) -> pathlib.Path:
    """A model-only checkpoint directory (no optimizer state: evaluation and export can read it,
    training cannot resume from it), with its manifest and COMPLETE marker. Single process."""
    from safetensors.torch import save as safetensors_bytes

    path.mkdir(parents=True)
    (path / "model").mkdir()
    plain = {k: v.detach().float().cpu().contiguous() for k, v in state_dict.items()}
    rel = "model/rank_00000.safetensors"
    files = {rel: write_file(path / rel, safetensors_bytes(plain)),
             "config.yaml": write_file(path / "config.yaml", config_yaml.encode()),
             "trainer_state.json": write_json(path / "trainer_state.json", trainer_state)}
    write_json(path / MANIFEST, {"format": FORMAT, "step": trainer_state.get("step", 0),
                                 "files": files,
                                 "tensors": {"model": {k: rel for k in plain}, "optim": {}}})
    write_file(path / "COMPLETE", b"model only\n")
    return path
