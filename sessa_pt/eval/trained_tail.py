"""The memory-tail diagnostic on a trained model: influence of residual-stream position tau on
position tau + lag, per block, with a fitted power-law exponent beta per layer.

For block i with input h_i (the residual stream after the embedding and blocks < i) and output
h_{i+1}, the influence is the RMS singular value of d h_{i+1, tau+lag} / d h_{i, tau}, estimated
by :func:`sessa_pt.eval.memory_tail.jacobian_influence`; ``model`` is the same for the whole
stack of blocks (embedding output to final residual stream). The input is one sequence: a
validation sample when ``--data`` is given, else uniform random tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sessa_pt.eval.common import Loaded
from sessa_pt.eval.memory_tail import TailFit, fit_tail, jacobian_influence, log_spaced_lags


def input_sequence(loaded: Loaded, seq_len: int, data: str | None, sample: int,
                   seed: int) -> torch.Tensor:
    if data:
        from sessa_pt.data import TokenShardDataset

        ds = TokenShardDataset(data)
        toks = torch.from_numpy(ds.tokens_numpy(sample % ds.num_samples).astype(np.int64))
        if len(toks) - 1 < seq_len:
            raise SystemExit(f"--seq-len {seq_len} exceeds the shards' seq_len {ds.seq_len}")
        return toks[:seq_len][None]
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, loaded.cfg.model.vocab_size, (1, seq_len), generator=gen)


def trained_memory_tail(loaded: Loaded, seq_len: int | None = None, tau: int = 0,
                        n_lags: int = 32, fit_min_lag: int = 16, n_probes: int = 8,
                        data: str | None = None, sample: int = 0,
                        seed: int = 0) -> dict[str, Any]:
    model, dev = loaded.model, loaded.device
    T = seq_len or loaded.cfg.data.seq_len
    if T <= tau + 2:
        raise SystemExit(f"--seq-len {T} must exceed --tau {tau} by at least 3")
    lags = log_spaced_lags(T - 1 - tau, n_lags)
    ids = input_sequence(loaded, T, data, sample, seed).to(dev)
    dtype = next(model.parameters()).dtype
    mixers = loaded.cfg.model.mixers()
    layers: list[dict[str, Any]] = []
    with torch.no_grad():
        h = model.embed(ids).to(dtype)
    h0 = h
    for i, block in enumerate(model.blocks):
        infl = jacobian_influence(block, h, tau, lags, n_probes=n_probes, seed=seed + i)
        layers.append(_layer_row(f"{i}", mixers[i], lags, infl, fit_min_lag))
        with torch.no_grad():
            h = block(h)

    def stack(x: torch.Tensor) -> torch.Tensor:
        for b in model.blocks:
            x = b(x)
        return x

    infl = jacobian_influence(stack, h0, tau, lags, n_probes=n_probes, seed=seed + 10_000)
    layers.append(_layer_row("model", "all", lags, infl, fit_min_lag))
    return {"checkpoint": str(loaded.checkpoint), "step": loaded.step, "seq_len": T, "tau": tau,
            "fit_min_lag": fit_min_lag, "lags": lags.tolist(), "layers": layers,
            "input": data or "random tokens"}


def _layer_row(name: str, mixer: str, lags: np.ndarray, infl: np.ndarray,
               fit_min_lag: int) -> dict[str, Any]:
    try:
        fit: TailFit | None = fit_tail(lags, infl, fit_min_lag)
    except ValueError:
        fit = None
    return {"layer": name, "mixer": mixer, "influence": infl.tolist(),
            "beta": fit.beta if fit else float("nan"),
            "r2_power": fit.r2_power if fit else float("nan"),
            "rate": fit.rate if fit else float("nan"),
            "r2_exp": fit.r2_exp if fit else float("nan"),
            "fit_points": fit.n_points if fit else 0}


def plot_tail(result: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lags = np.array(result["lags"])
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in result["layers"]:
        y = np.array(row["influence"])
        keep = y > 0
        style = "k-" if row["layer"] == "model" else "-"
        ax.loglog(lags[keep], y[keep], style, marker="o", ms=2,
                  label=f"{'model' if row['layer'] == 'model' else 'layer ' + row['layer']} "
                        f"({row['mixer']}) beta={row['beta']:.2f}")
    ax.set_xlabel("lag")
    ax.set_ylabel("influence |dy_{tau+lag} / dx_tau|")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
