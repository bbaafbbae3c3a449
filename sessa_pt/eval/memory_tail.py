"""Memory-tail diagnostic: how strongly input position tau still influences output tau + lag.

For a Sessa mixer the influence is the feedback resolvent |ds_t/df_tau| = |[(I - B_fb)^-1]_{t,tau}|
(the same for every channel). For any other module (an attention or Mamba2 mixer, a block, a
model's residual stream) it is the RMS singular value of the Jacobian block dy_t/dx_tau, i.e.
||dy_t/dx_tau||_F / sqrt(D), estimated with random probes by reverse-mode autograd.

The tail exponent beta is fitted on log-log axes (influence ~ lag^-beta); an exponential fit
(log influence ~ -rate * lag) is reported beside it so the two memory laws can be told apart:
Sessa with diffuse routing and constant gain gamma: beta = 1 - gamma (docs/model.md §5);
diffuse attention: ~1/lag; Mamba2: exponential decay.

CLI: ``python -m sessa_pt.eval.memory_tail --help``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sessa_pt.models.feedback import feedback_dense


@dataclass
class TailFit:
    beta: float            # power law: influence ~ C lag^-beta
    r2_power: float
    rate: float            # exponential: influence ~ C exp(-rate lag)
    r2_exp: float
    n_points: int


def uniform_routing_influence(gamma: float, seq_len: int, tau: int = 0) -> np.ndarray:
    """|ds_{tau+lag}/df_tau| for lag = 0..seq_len-tau-1 with alpha[t, j] = 1/t, constant gamma
    (all q_b = k_b = 0), computed by the dense solve in float64."""
    z = torch.zeros(1, seq_len, 1, dtype=torch.float64)
    f = torch.zeros(1, seq_len, 1, dtype=torch.float64)
    f[0, tau, 0] = 1.0
    g = torch.full((1, seq_len), float(gamma), dtype=torch.float64)
    s = feedback_dense(z, z, g, f)
    return s[0, tau:, 0].abs().numpy()


def uniform_routing_closed_form(gamma: float, tau: int, lag: np.ndarray) -> np.ndarray:
    """gamma * Gamma(tau+1)/Gamma(tau+1+gamma) * Gamma(tau+lag+gamma)/Gamma(tau+lag+1), lag >= 1."""
    lg = math.lgamma
    c = math.log(gamma) + lg(tau + 1) - lg(tau + 1 + gamma)
    return np.array([math.exp(c + lg(tau + l + gamma) - lg(tau + l + 1)) for l in lag])


def sessa_mixer_influence(mixer, a: Tensor, tau: int) -> np.ndarray:
    """|ds_t/df_tau| for t = tau.. under the routing and gains the mixer computes from input a
    (batch element 0)."""
    with torch.no_grad():
        q_b, k_b, gamma = mixer.feedback_inputs(a[:1])
        T = a.shape[1]
        f = torch.zeros(1, T, 1, dtype=torch.float64, device=q_b.device)
        f[0, tau, 0] = 1.0
        s = feedback_dense(q_b.double(), k_b.double(), gamma.double(), f)
    return s[0, tau:, 0].abs().cpu().numpy()


def jacobian_influence(fn: Callable[[Tensor], Tensor], x: Tensor, tau: int, lags: np.ndarray,
                       n_probes: int = 8, seed: int = 0) -> np.ndarray:
    """RMS singular value of dy_{tau+lag}/dx_tau for each lag, for fn: (B, T, D) -> (B, T, D').

    ``x`` is one sequence (1, T, D); ``n_probes`` random output directions are pushed back in one
    batched backward pass per lag (E ||J^T w||^2 = ||J||_F^2 for w ~ N(0, I))."""
    gen = torch.Generator().manual_seed(seed)
    xb = x.detach().expand(n_probes, -1, -1).clone().requires_grad_(True)
    y = fn(xb)
    d_out = y.shape[-1]
    out = []
    for i, lag in enumerate(lags):
        # drawn on the CPU generator (the same probes on every device), used on y's device
        w = torch.randn(n_probes, d_out, generator=gen, dtype=y.dtype).to(y.device)
        (g,) = torch.autograd.grad((y[:, tau + int(lag)] * w).sum(), xb,
                                   retain_graph=i < len(lags) - 1)
        out.append(float(g[:, tau].pow(2).sum(-1).mean().sqrt()) / math.sqrt(d_out))
    return np.array(out)


def fit_tail(lags: np.ndarray, influence: np.ndarray, min_lag: int = 16) -> TailFit:
    keep = (lags >= min_lag) & (influence > 0)
    lx, ly = np.log(lags[keep].astype(np.float64)), np.log(influence[keep])
    if keep.sum() < 3:
        raise ValueError(f"only {int(keep.sum())} lags >= {min_lag} with non-zero influence; "
                         "use a longer --seq-len or a smaller --fit-min-lag")

    def linfit(xv: np.ndarray) -> tuple[float, float]:
        slope, icpt = np.polyfit(xv, ly, 1)
        resid = ly - (slope * xv + icpt)
        r2 = 1 - resid.var() / max(ly.var(), 1e-300)
        return float(slope), float(r2)

    s_pow, r2_pow = linfit(lx)
    s_exp, r2_exp = linfit(lags[keep].astype(np.float64))
    return TailFit(beta=-s_pow, r2_power=r2_pow, rate=-s_exp, r2_exp=r2_exp,
                   n_points=int(keep.sum()))


def log_spaced_lags(max_lag: int, n: int = 48) -> np.ndarray:
    return np.unique(np.round(np.geomspace(1, max_lag, n)).astype(int))


def _build_mixer(kind: str, d_model: int, n_heads: int, seed: int, routing: str):
    from sessa_pt.models import AttentionMixer, SessaMixer

    torch.manual_seed(seed)
    if kind == "sessa":
        return SessaMixer(d_model, n_heads).double()
    if kind == "attention":
        m = AttentionMixer(d_model, n_heads, use_rope=routing != "uniform").double()
        if routing == "uniform":   # diffuse attention: every query scores every key equally
            with torch.no_grad():
                m.q_proj.weight.zero_()
                m.q_proj.bias.zero_()
        return m
    if kind == "mamba2":
        from sessa_pt.models.mamba2 import Mamba2Mixer

        return Mamba2Mixer(d_model, head_dim=min(64, 2 * d_model // 4)).double()
    raise ValueError(f"unknown --mixer {kind!r}")


def measure(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Returns (lags, influence, closed_form_or_None)."""
    T, tau = args.seq_len, args.tau
    if T <= tau + 2:
        raise ValueError(f"--seq-len {T} must exceed --tau {tau} by at least 3")
    lags = log_spaced_lags(T - 1 - tau, args.n_lags)
    if args.mixer == "sessa" and args.routing == "uniform":
        infl = uniform_routing_influence(args.gamma, T, tau)[lags]
        return lags, infl, uniform_routing_closed_form(args.gamma, tau, lags)
    mixer = _build_mixer(args.mixer, args.d_model, args.n_heads, args.seed, args.routing)
    gen = torch.Generator().manual_seed(args.seed)
    a = torch.randn(1, T, args.d_model, generator=gen, dtype=torch.float64)
    if args.mixer == "sessa":
        return lags, sessa_mixer_influence(mixer, a, tau)[lags], None
    return lags, jacobian_influence(mixer, a, tau, lags, seed=args.seed), None


def format_table(lags, infl, closed=None, every: int = 1) -> str:
    head = f"{'lag':>8} {'influence':>14}" + (f" {'closed form':>14}" if closed is not None else "")
    rows = [head]
    for i in range(0, len(lags), every):
        row = f"{int(lags[i]):>8} {infl[i]:>14.8g}"
        if closed is not None:
            row += f" {closed[i]:>14.8g}"
        rows.append(row)
    return "\n".join(rows)


def plot(lags, infl, path: str, title: str, fit: TailFit | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.loglog(lags, infl, "o-", ms=3, label="measured")
    if fit is not None and np.isfinite(fit.beta):
        ref = infl[-1] * (lags / lags[-1]) ** (-fit.beta)
        ax.loglog(lags, ref, "--", label=f"fit lag^-{fit.beta:.3f}")
    ax.set_xlabel("lag")
    ax.set_ylabel("influence")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sessa_pt.eval.memory_tail",
        description="Influence of input position tau on output tau+lag against lag, with a "
                    "fitted power-law tail exponent beta (and an exponential rate for contrast).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mixer", choices=["sessa", "attention", "mamba2"], default="sessa",
                   help="sequence mixer to probe (randomly initialised, float64)")
    p.add_argument("--routing", choices=["uniform", "model"], default="uniform",
                   help="uniform: Sessa with q_b = k_b = 0 and constant --gamma (the construction of "
                        "docs/model.md §5), or diffuse attention (zero queries); model: the "
                        "mixer's own routing at random init")
    p.add_argument("--gamma", type=float, default=0.5,
                   help="constant feedback gain for --routing uniform (in (0, 1))")
    p.add_argument("--seq-len", type=int, default=4097, help="sequence length T")
    p.add_argument("--tau", type=int, default=0, help="source position")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-lags", type=int, default=48, help="log-spaced lags to measure")
    p.add_argument("--fit-min-lag", type=int, default=32, help="fit the tail on lags >= this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="PNG", help="write a log-log plot to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.routing == "uniform" and args.mixer == "sessa" and not 0 < args.gamma < 1:
        raise SystemExit("--gamma must lie in (0, 1) for the uniform-routing construction")
    lags, infl, closed = measure(args)
    fit = fit_tail(lags, infl, args.fit_min_lag)
    print(format_table(lags, infl, closed))
    print(f"\nfit on lags >= {args.fit_min_lag} ({fit.n_points} points): "
          f"power law beta = {fit.beta:.4f} (R^2 {fit.r2_power:.4f}); "
          f"exponential rate = {fit.rate:.3g}/token (R^2 {fit.r2_exp:.4f})")
    if args.mixer == "sessa" and args.routing == "uniform":
        print(f"theory (uniform routing, constant gamma): beta = 1 - gamma = {1 - args.gamma:.4f}")
    if args.plot:
        plot(lags, infl, args.plot, f"{args.mixer} ({args.routing})", fit)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
