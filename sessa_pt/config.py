"""The run configuration: one documented dataclass tree, loaded from a YAML recipe with
``key=value`` overrides, validated before anything starts.

A recipe may name a ``base:`` recipe (path relative to itself) whose values it overrides, so a
family of matched recipes shares one base and differs only where it says so.
"""

from __future__ import annotations

import dataclasses
import pathlib
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from sessa_pt.models.config import ModelConfig


@dataclass
class ParallelConfig:
    tp: int = 1                 # tensor parallel size (megatron-core layers)
    pp: int = 1                 # pipeline parallel size (DeepSpeed PipelineModule)
    zero_stage: Literal[0, 1, 2, 3] = 1  # DeepSpeed ZeRO stage (pp > 1 allows 0 and 1 only)
    grad_accum_dtype: Literal["fp32", "bf16"] = "fp32"  # gradient accumulation dtype under bf16
    zero3_persistence_threshold: int = 100_000  # ZeRO-3: parameters with fewer elements stay
                                # whole on every rank (DeepSpeed's
                                # stage3_param_persistence_threshold; memory, not results)
    # data parallel size = world_size / (tp * pp)


@dataclass
class DataConfig:
    train: str = ""             # path to a train manifest.json (sessa-data tokenize output)
    valid: str = ""             # path to a validation manifest.json ("" = no validation)
    seq_len: int = 256          # must equal the shards' seq_len
    tokenizer_hash: str = ""    # expected sha256 of the tokenizer ("" = take the train shards')
    num_workers: int = 1        # DataLoader workers per rank
    skip_corrupt: bool = False  # skip (and log) corrupt shards instead of failing
    context_loss_weight: float = 0.0  # task shards: next-token loss on the context tokens too,
                                # with this weight per token (an answer token weighs 1); 0 =
                                # answers only. Training only: val_loss stays the answer loss.


@dataclass
class OptimConfig:
    lr: float = 3e-3             # peak learning rate (AdamW)
    min_lr: float = 3e-4         # the learning rate at the end of the cosine / wsd decay
    weight_decay: float = 0.1    # decoupled weight decay of matrices (none on biases, norms,
                                 # gains and other parameters of dim < 2)
    beta1: float = 0.9           # AdamW beta1
    beta2: float = 0.95          # AdamW beta2
    eps: float = 1e-8            # AdamW epsilon
    grad_clip: float = 1.0       # clip the global gradient norm to this (0 = no clipping)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"  # after the linear warmup:
                                 # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 10       # linear warmup from 0 to lr
    decay_fraction: float = 0.2  # wsd: fraction of steps in the final linear decay
    fused: bool = False          # torch's fused AdamW kernel (one launch per step; CUDA)


@dataclass
class TrainConfig:
    steps: int = 100             # optimizer steps
    micro_batch_size: int = 8    # sequences per rank per micro step
    global_batch_size: int = 16  # sequences per optimizer step (= micro * grad_accum * dp)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    compile: bool = False        # torch.compile each block and the loss (GPU throughput);
                                 # the loss only at tp=1, pp=1
    activation_checkpointing: Literal["none", "blocks"] = "none"  # none | blocks: keep only each block's input
                                 # in the forward and recompute the block in the backward
                                 # (less activation memory for long T / large models, about
                                 # one more forward of compute; same gradients)
    loss_chunk_tokens: int = 0   # > 0: LM head + loss over this many tokens at a time
                                 # (never all fp32 logits at once; tp=1, pp=1 only)
    log_every: int = 1           # print a log line every N steps (every step is in the log file)
    nonfinite: Literal["abort", "skip"] = "abort"  # a step whose loss or grad norm is NaN/inf on any rank is
                                 # never applied (the optimizer skips it) and never saved;
                                 # abort: the run fails after nonfinite_max_consecutive such
                                 # steps in a row | skip: count them and train on
    nonfinite_max_consecutive: int = 3   # abort after this many consecutive non-finite steps
    spike_factor: float = 4.0    # log a loss spike (step + sample ids) when the loss exceeds
                                 # this multiple of its running mean (0 = off)
    spike_window: int = 50       # steps in the spike detector's running mean


@dataclass
class CheckpointConfig:
    every: int = 50              # save every N steps (and at the end); 0 = only at the end
    keep_last: int = 2           # keep the newest K complete checkpoints
    resume: bool = True          # resume from the newest complete checkpoint in run.dir
    allow_batch_size_change: bool = False  # resume with another train.global_batch_size (the
                                 # samples seen so far must be a multiple of the new one)


@dataclass
class TrackingConfig:
    enabled: bool = True         # log params, metrics and artifacts to mlflow (rank 0)
    uri: str = ""                # "" = MLFLOW_TRACKING_URI, else a local store in run.dir
    experiment: str = "sessa_pt"  # mlflow experiment name
    run_name: str = ""           # "" = the recipe name
    probe_timeout_s: float = 5.0  # an http(s) URI must answer within this at start-up, else the
                                  # run fails before any model is built
    flush_timeout_s: float = 60.0  # at the end, wait this long for queued metrics to reach an
                                   # unreachable server (they stay in train_log.jsonl anyway)
    system_metrics: bool = True  # mlflow system metrics (CPU, memory, GPU) while training
    system_metrics_interval_s: float = 10.0  # their sampling interval


@dataclass
class EvalConfig:
    every: int = 50              # validation every N steps (and at the end); 0 = only at the end
    max_batches: int = 20        # micro-batches per rank per validation (0 = the whole set)


@dataclass
class RunConfig:
    dir: str = ""                # run directory ("" = runs/<recipe name>)
    seed: int = 1234             # model init and data order
    name: str = ""               # recipe name (filled from the recipe file)
    peak_tflops: float = 0.0     # accelerator peak for MFU (0 = look up by device name)
    overwrite: bool = False      # with checkpoint.resume=false on a run.dir that holds
                                 # checkpoints: move the old dir aside (<dir>.old-<time>) and
                                 # start over; never deletes anything
    startup_timeout_s: float = 1800.0  # process-group timeout while starting up (rendezvous,
                                       # model build, engine init, data, resume)
    step_timeout_s: float = 600.0  # process-group timeout once training runs; a step that takes
                                   # longer dumps every rank's Python stacks to
                                   # <run.dir>/stacks_rank<r>.txt
    orphan_exit_s: float = 300.0  # a worker whose launcher died stops at the next step
                                  # boundary; if it is not done after this long it exits anyway


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message says what to change."""


# ---- loading ---------------------------------------------------------------------------------

def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe(path: str | pathlib.Path) -> dict:
    """A recipe's YAML as a dict, with its ``base:`` chain merged underneath."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist (recipes live in recipes/, e.g. "
                          "recipes/tiny/sessa.yaml)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping")
    base = raw.pop("base", None)
    if base:
        raw = _merge(read_recipe(path.parent / base), raw)
    return raw


def _coerce(value: str) -> Any:
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):      # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(parsed)
        except ValueError:
            pass
    return parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``a.b.c=value`` overrides (values parsed as YAML: 3, 1e-3, true, [a, b], null)."""
    raw = _merge({}, raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value "
                              "(e.g. train.steps=10)")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[parts[-1]] = _coerce(value)
    return raw


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + k for k in unknown)}; "
                          f"valid keys of {where or 'the top level'}: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in data.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kwargs[k] = _build(t, v, f"{where}{k}.")
        else:
            kwargs[k] = _check_type(v, t, f"{where}{k}")
    return cls(**kwargs)


def _check_type(v: Any, t: Any, key: str) -> Any:
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin is Literal:     # a choice: the value must be one of them (True is not 1)
        if any(v == a and type(v) is type(a) for a in args):
            return v
        raise ConfigError(f"{key}={v!r} is not a valid choice: choose one of "
                          f"{', '.join(repr(a) for a in args)}")
    if v is None and (t is type(None) or type(None) in args):
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:            # "X | None": X's own message says what is wrong
            return _check_type(v, real[0], key)
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(v, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={v!r} has the wrong type (expected {t})")
    if origin is list:
        if not isinstance(v, list):
            raise ConfigError(f"{key} must be a list, got {v!r}")
        return [_check_type(x, args[0], key) for x in v] if args else v
    if t is float:
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                pass
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        raise ConfigError(f"{key}={v!r} has the wrong type (expected a number)")
    if t in (int, str, bool) and not (isinstance(v, t) and not (t is int and isinstance(v, bool))):
        raise ConfigError(f"{key}={v!r} has the wrong type (expected {t.__name__})")
    return v


def load_config(recipe: str | pathlib.Path | None, overrides: list[str] | None = None) -> Config:
    raw = read_recipe(recipe) if recipe else {}
    raw = apply_overrides(raw, overrides or [])
    cfg = _build(Config, raw, "")
    if recipe and not cfg.run.name:
        cfg.run.name = pathlib.Path(recipe).stem if pathlib.Path(recipe).stem != "base" else \
            pathlib.Path(recipe).parent.name
    if not cfg.run.dir:
        cfg.run.dir = str(pathlib.Path("runs") / (cfg.run.name or "run"))
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---- validation ------------------------------------------------------------------------------

def _parallel_errors(cfg: Config) -> list[str]:
    p, m = cfg.parallel, cfg.model
    e: list[str] = []
    if p.zero3_persistence_threshold < 0:
        e.append(f"parallel.zero3_persistence_threshold={p.zero3_persistence_threshold}: "
                 "choose 0 (partition every parameter) or more")
    if p.pp > 1 and p.zero_stage >= 2:
        e.append(f"parallel.pp={p.pp} with parallel.zero_stage={p.zero_stage}: DeepSpeed's "
                 "pipeline engine supports ZeRO stages 0 and 1 only; set parallel.zero_stage=1")
    if p.pp > m.n_layers:
        e.append(f"parallel.pp={p.pp} exceeds model.n_layers={m.n_layers}")
    if p.tp > 1:
        kv = m.n_kv_heads or m.n_heads
        if m.n_heads % p.tp or kv % p.tp:
            e.append(f"model.n_heads={m.n_heads} and n_kv_heads={kv} must be divisible by "
                     f"parallel.tp={p.tp}")
        if m.d_model % p.tp:
            e.append(f"model.d_model={m.d_model} must be divisible by parallel.tp={p.tp}")
        if m.vocab_size % p.tp:
            padded = -(-m.vocab_size // (128 * p.tp)) * 128 * p.tp
            e.append(f"model.vocab_size={m.vocab_size} is not a multiple of parallel.tp={p.tp}: "
                     f"pad it (e.g. model.vocab_size={padded}; extra rows are never targets)")
        if "mamba2" in m.mixers():
            heads = m.mamba2.expand * m.d_model // m.mamba2.head_dim
            if m.mamba2.n_groups % p.tp or heads % p.tp:
                e.append(f"mamba2 under parallel.tp={p.tp} splits heads and B/C groups: "
                         f"model.mamba2.n_groups={m.mamba2.n_groups} and the {heads} heads must "
                         f"be divisible by tp (e.g. model.mamba2.n_groups={p.tp})")
    return e


def _precision_errors(cfg: Config, cuda: bool) -> list[str]:
    """Combinations of precision, layout and clipping that DeepSpeed gets wrong."""
    p, e = cfg.parallel, []
    precision = resolve_precision(cfg, cuda)
    if precision == "bf16" and p.pp > 1 and p.grad_accum_dtype != "fp32":
        e.append("bf16 with parallel.pp>1 needs fp32 gradient accumulation (bf16 accumulation "
                 "over micro-batches diverges); set parallel.grad_accum_dtype=fp32")
    if cfg.optim.grad_clip > 0 and p.zero_stage == 0:
        if p.pp > 1 and precision == "fp32":
            e.append("fp32 + parallel.pp>1 + zero_stage=0 with gradient clipping: DeepSpeed "
                     "0.19.8 computes the grad norm on stage 0's parameters only; set "
                     "parallel.zero_stage=1")
        if p.tp > 1 and p.pp == 1 and precision == "bf16":
            e.append("bf16 + parallel.tp>1 + zero_stage=0: DeepSpeed 0.19.8's bf16 optimizer "
                     "loses the tensor-parallel flags and clips with a wrong grad norm; set "
                     "parallel.zero_stage=1")
    return e


def _data_errors(cfg: Config) -> list[str]:
    e = []
    if not cfg.data.train:
        e.append("data.train is empty: point it at a train manifest.json written by "
                 "`sessa-data tokenize` (e.g. data.train=data/shards/train/manifest.json)")
    if cfg.data.context_loss_weight < 0:
        e.append(f"data.context_loss_weight={cfg.data.context_loss_weight}: must be >= 0 (0 = "
                 "loss on the answer tokens only)")
    return e


def _optim_errors(cfg: Config) -> list[str]:
    return [] if 0 <= cfg.optim.decay_fraction <= 1 else \
        ["optim.decay_fraction must lie in [0, 1]"]


def _train_errors(cfg: Config, dp: int) -> list[str]:
    t, p, e = cfg.train, cfg.parallel, []
    if t.micro_batch_size <= 0 or t.global_batch_size <= 0:
        e.append("train.micro_batch_size and train.global_batch_size must be positive")
    elif t.global_batch_size % (t.micro_batch_size * dp):
        e.append(f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                 f"micro_batch_size*dp = {t.micro_batch_size}*{dp}")
    if t.loss_chunk_tokens < 0:
        e.append("train.loss_chunk_tokens must be >= 0 (0 = off)")
    elif t.loss_chunk_tokens and (p.tp > 1 or p.pp > 1):
        e.append("train.loss_chunk_tokens applies to tp=1, pp=1 runs (TP uses the vocab-"
                 "parallel cross entropy, PP computes the loss in its last stage); set it to 0")
    if t.steps <= 0:
        e.append("train.steps must be positive")
    if t.nonfinite_max_consecutive < 1:
        e.append("train.nonfinite_max_consecutive must be >= 1")
    if t.spike_factor < 0 or (t.spike_factor and t.spike_factor <= 1):
        e.append(f"train.spike_factor={t.spike_factor}: use a factor > 1 (0 = off)")
    if t.spike_window < 2:
        e.append("train.spike_window must be >= 2")
    return e


def _run_errors(cfg: Config) -> list[str]:
    r = cfg.run
    if r.startup_timeout_s <= 0 or r.step_timeout_s <= 0 or r.orphan_exit_s <= 0:
        return ["run.startup_timeout_s, run.step_timeout_s and run.orphan_exit_s must be > 0"]
    return []


def _device_errors(cfg: Config, cuda: bool) -> list[str]:
    m = cfg.model
    if m.sessa.impl == "triton" and not cuda and "sessa" in m.mixers():
        return ["model.sessa.impl=triton needs a GPU; use model.sessa.impl=chunked on CPU"]
    return []


def validate(cfg: Config, world_size: int, cuda: bool) -> list[str]:
    """Every reason this config cannot run on ``world_size`` processes; empty when it can.
    (Choices and types were checked when the config was loaded.)"""
    e: list[str] = []
    try:
        cfg.model.validate()
    except ValueError as err:
        e.append(str(err))
    p = cfg.parallel
    if p.tp < 1 or p.pp < 1:
        return [*e, "parallel.tp and parallel.pp must be >= 1"]
    if world_size % (p.tp * p.pp):
        return [*e, (f"world size {world_size} is not divisible by tp*pp = {p.tp}*{p.pp}; "
                     f"launch a multiple of {p.tp * p.pp} processes or change parallel.tp or "
                     "parallel.pp")]
    dp = world_size // (p.tp * p.pp)
    return [*e, *_parallel_errors(cfg), *_precision_errors(cfg, cuda),
            *_data_errors(cfg), *_optim_errors(cfg), *_train_errors(cfg, dp), *_run_errors(cfg),
            *_device_errors(cfg, cuda)]


def resolve_precision(cfg: Config, cuda: bool) -> str:
    if cfg.train.precision == "auto":
        return "bf16" if cuda else "fp32"
    return cfg.train.precision


def check(cfg: Config, world_size: int, cuda: bool) -> None:
    errors = validate(cfg, world_size, cuda)
    if errors:
        raise ConfigError("the run configuration cannot run:\n  - " + "\n  - ".join(errors))


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m sessa_pt.config",
        description="Print a recipe's resolved configuration, or the reference of every field.")
    ap.add_argument("recipe", nargs="?", help="recipe YAML (e.g. recipes/tiny/sessa.yaml)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    ap.add_argument("--doc", action="store_true",
                    help="print the field reference (docs/config.md) and exit")
    args = ap.parse_args(argv)
    if args.doc:
        from sessa_pt.config_doc import reference

        print(reference(Config), end="")
        return 0
    if not args.recipe:
        ap.error("give a recipe, or --doc")
    print(yaml.safe_dump(to_dict(load_config(args.recipe, args.overrides)), sort_keys=False),
          end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
