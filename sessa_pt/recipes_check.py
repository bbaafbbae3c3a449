"""Check (and help size) a matched recipe family: ``python -m sessa_pt.recipes_check recipes/F``.

A family is a directory with a ``base.yaml`` and variant recipes (``sessa.yaml``,
``transformer.yaml``, ``mamba2.yaml``, ``transformer_mlp.yaml``) that inherit it. The check
builds every variant's model on the meta device (no memory, no time), prints a table (variant,
mixer, block, d_model, n_layers, non-embedding parameters, ratio to the Sessa variant, forward
FLOPs per token at the family's ``data.seq_len``) and fails (exit 1) when

- a variant differs from the Sessa variant outside the architecture fields (``model.*`` and
  ``run.name``; ``run.dir`` follows ``run.name`` and may not be set by a variant), or
- its non-embedding parameters differ from the Sessa variant's by more than ``--tolerance``
  (default 2%). The exception is the ablation without the feedback branch: a variant whose model
  is Sessa's with only ``model.sessa.feedback: false`` keeps Sessa's shape, so it has fewer
  parameters by construction (the ones the feedback branch would have).

``--suggest`` lists, for every non-Sessa variant, the (d_model, n_layers) pairs closest to the
Sessa variant's non-embedding parameters under the mixer's shape constraints: the generator half
of the tool, used to choose the numbers written in the recipes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
from dataclasses import dataclass
from typing import Any

from sessa_pt.config import Config, flatten, load_config, read_recipe, to_dict

REFERENCE = "sessa"
ARCH_PREFIXES = ("model.",)
ARCH_KEYS = ("run.name", "run.dir")
TOLERANCE = 0.02


@dataclass
class VariantInfo:
    name: str
    path: pathlib.Path
    cfg: Config
    params_total: int
    params_non_embedding: int
    flops_per_token: float


def family_recipes(family: str | pathlib.Path) -> list[pathlib.Path]:
    """The variant recipes of a family directory (every ``*.yaml`` except ``base.yaml``), the
    Sessa variant first."""
    d = pathlib.Path(family)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a recipe family directory (e.g. recipes/small)")
    paths = sorted(p for p in d.glob("*.yaml") if p.name != "base.yaml")
    if not any(p.stem == REFERENCE for p in paths):
        raise FileNotFoundError(f"{d} has no {REFERENCE}.yaml: the reference variant of a family")
    return sorted(paths, key=lambda p: (p.stem != REFERENCE, p.stem))


def count(cfg: Config) -> tuple[int, int, float]:
    """(total params, non-embedding params, forward FLOPs/token at data.seq_len) of a config's
    model, built on the meta device."""
    import torch

    from sessa_pt.models.lm import DecoderLM

    with torch.device("meta"):
        model = DecoderLM(cfg.model, seed=0)
    n = model.num_params()
    return n["total"], n["non_embedding"], float(model.flops_per_token(cfg.data.seq_len))


def load_family(family: str | pathlib.Path) -> list[VariantInfo]:
    out = []
    for path in family_recipes(family):
        cfg = load_config(path)
        total, non_emb, flops = count(cfg)
        out.append(VariantInfo(path.stem, path, cfg, total, non_emb, flops))
    return out


def non_architecture_differences(ref: Config, other: Config) -> list[str]:
    """Flattened config keys where ``other`` differs from ``ref`` outside the architecture."""
    a, b = flatten(to_dict(ref)), flatten(to_dict(other))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(ARCH_PREFIXES) or key in ARCH_KEYS:
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} (sessa) != {b.get(key)!r}")
    return diffs


def is_feedback_ablation(ref: Config, other: Config) -> bool:
    """``other`` is ``ref``'s model with the feedback branch switched off and nothing else."""
    a, b = flatten(to_dict(ref)), flatten(to_dict(other))
    model_diffs = {k for k in set(a) | set(b) if k.startswith("model.") and a.get(k) != b.get(k)}
    return model_diffs == {"model.sessa.feedback"} and b.get("model.sessa.feedback") is False


def problems(family: str | pathlib.Path, tolerance: float = TOLERANCE,
             variants: list[VariantInfo] | None = None) -> list[str]:
    """Every way the family violates the matching rules; empty when it is matched."""
    variants = variants if variants is not None else load_family(family)
    ref = variants[0]
    out = []
    for v in variants:
        raw = read_recipe(v.path)
        if v is not ref and "dir" in raw.get("run", {}):
            out.append(f"{v.name}: sets run.dir; let it follow run.name")
        if v is ref:
            continue
        out += [f"{v.name}: {d}" for d in non_architecture_differences(ref.cfg, v.cfg)]
        ratio = v.params_non_embedding / ref.params_non_embedding
        if abs(ratio - 1) > tolerance and not is_feedback_ablation(ref.cfg, v.cfg):
            out.append(f"{v.name}: {v.params_non_embedding:,} non-embedding parameters = "
                       f"{ratio:.4f} x sessa's {ref.params_non_embedding:,} (allowed within "
                       f"{100 * tolerance:g}%); `--suggest` lists matching sizes")
    names = [v.cfg.run.name for v in variants]
    if len(set(names)) != len(names):
        out.append(f"run.name collides between variants: {names}")
    return out


def format_table(variants: list[VariantInfo]) -> str:
    ref = variants[0].params_non_embedding
    head = (f"{'variant':<16} {'mixer':<10} {'block':<12} {'d_model':>7} {'n_layers':>8} "
            f"{'params non-emb':>15} {'ratio':>7} {'params total':>13} {'GFLOPs/tok fwd':>15}")
    rows = [head, "-" * len(head)]
    for v in variants:
        m = v.cfg.model
        rows.append(f"{v.name:<16} {m.mixer:<10} {m.block:<12} {m.d_model:>7} {m.n_layers:>8} "
                    f"{v.params_non_embedding:>15,} {v.params_non_embedding / ref:>7.4f} "
                    f"{v.params_total:>13,} {v.flops_per_token / 1e9:>15.4f}")
    return "\n".join(rows)


def width_step(cfg: Config) -> int:
    """The granularity of d_model for this variant's shape constraints (heads divide d_model
    with an even head dim; Mamba2's expand * d_model divisible by its head_dim)."""
    m = cfg.model
    step = 2 * m.n_heads if m.use_rope else m.n_heads
    if m.mixer == "mamba2":
        need = m.mamba2.head_dim // math.gcd(m.mamba2.head_dim, m.mamba2.expand)
        step = step * need // math.gcd(step, need)
    return step


def suggest(variant: VariantInfo, target: int, top: int = 6, layer_range: int = 4,
            tolerance: float = TOLERANCE) -> list[tuple[int, int, int, float]]:
    """(d_model, n_layers, non-embedding params, ratio) pairs for ``target``, keeping every
    other field of the variant; searched over n_layers +- layer_range and d_model in steps.
    Pairs within the tolerance come first, those keeping the variant's depth before others."""
    m = variant.cfg.model
    step = width_step(variant.cfg)
    found = []
    for n_layers in range(max(1, m.n_layers - layer_range), m.n_layers + layer_range + 1):
        lo, hi = max(step, int(m.d_model * 0.5) // step * step), int(m.d_model * 1.6)
        for d in range(lo, hi + 1, step):
            cfg = dataclasses.replace(variant.cfg, model=dataclasses.replace(
                m, d_model=d, n_layers=n_layers, layer_mixers=None))
            try:
                _, non_emb, _ = count(cfg)
            except ValueError:
                continue
            found.append((d, n_layers, non_emb, non_emb / target))
    found.sort(key=lambda r: (abs(r[3] - 1) > tolerance, abs(r[1] - m.n_layers), abs(r[3] - 1)))
    return found[:top]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sessa_pt.recipes_check", description=__doc__
                                .split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("families", nargs="+", help="family directories, e.g. recipes/small")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="allowed relative difference of non-embedding parameters (0.02 = 2%%)")
    p.add_argument("--suggest", action="store_true",
                   help="list (d_model, n_layers) pairs that match the Sessa variant")
    return p


def check_family(family: str, tolerance: float, show_suggestions: bool) -> list[str]:
    variants = load_family(family)
    print(f"== {family} (seq_len {variants[0].cfg.data.seq_len}, vocab "
          f"{variants[0].cfg.model.vocab_size})")
    print(format_table(variants))
    if show_suggestions:
        target = variants[0].params_non_embedding
        for v in variants[1:]:
            print(f"\n{v.name}: closest (d_model, n_layers) to {target:,} (d_model step "
                  f"{width_step(v.cfg)})")
            for d, n, non_emb, ratio in suggest(v, target, tolerance=tolerance):
                print(f"  d_model={d:<5} n_layers={n:<3} {non_emb:>13,}  ratio {ratio:.4f}")
    errs = problems(family, tolerance, variants)
    print("\n".join(f"FAIL {e}" for e in errs) if errs else "OK: matched")
    return errs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    failed = False
    for fam in args.families:
        try:
            errs = check_family(fam, args.tolerance, args.suggest)
        except (FileNotFoundError, ValueError) as err:
            print(f"FAIL {fam}: {err}", file=sys.stderr)
            errs = [str(err)]
        failed |= bool(errs)
        print()
    return 1 if failed else 0


def summary_rows(family: str | pathlib.Path) -> list[dict[str, Any]]:
    """The table as dicts (for reports and tests)."""
    variants = load_family(family)
    ref = variants[0].params_non_embedding
    return [{"variant": v.name, "mixer": v.cfg.model.mixer, "block": v.cfg.model.block,
             "d_model": v.cfg.model.d_model, "n_layers": v.cfg.model.n_layers,
             "params_non_embedding": v.params_non_embedding, "params_total": v.params_total,
             "ratio": v.params_non_embedding / ref, "flops_per_token_fwd": v.flops_per_token}
            for v in variants]


if __name__ == "__main__":
    raise SystemExit(main())
