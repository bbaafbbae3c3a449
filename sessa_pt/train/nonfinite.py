"""Non-finite steps and loss spikes.

A step whose loss or gradients are NaN/inf on any rank is not applied: ``GuardedAdamW`` (the
client optimizer DeepSpeed wraps on every layout) all-reduces one "non-finite" flag before its
update and skips the update on every rank when it is set, so the weights stay those of the last
finite step. ``NonFinitePolicy`` counts such steps; under ``train.nonfinite=abort`` the run
fails after ``train.nonfinite_max_consecutive`` of them in a row, and no checkpoint is written
after a non-finite step.

``SpikeDetector`` flags a loss above ``train.spike_factor`` times the running mean of the last
``train.spike_window`` finite losses, so that the batch can be replayed from its sample ids.
"""

from __future__ import annotations

import collections
import math

import torch

from sessa_pt.parallel.topology import any_rank

# the trainer's exit status when it stops on NonFiniteError (a diverged run, not a crash)
EXIT_DIVERGED = 3


class NonFiniteError(RuntimeError):
    """The run diverged: too many consecutive non-finite steps."""


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips its update when any rank's gradients (or the step's loss) are
    non-finite. DeepSpeed calls ``step`` on every rank at every optimizer step (ZeRO-3 once per
    parameter sub-group): the flag is all-reduced at the first call of a step and reused for the
    others, so all ranks decide alike. The LR schedule still advances on a skipped step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.begin_step()

    def begin_step(self, loss_nonfinite: bool = False) -> None:
        """Called by the trainer before each optimizer step."""
        self._loss_nonfinite = loss_nonfinite
        self.skipped: bool | None = None

    def mark_loss_nonfinite(self) -> None:
        self._loss_nonfinite = True

    def _grads_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        norms = torch._foreach_norm(grads)
        return bool(torch.stack([n.float() for n in norms]).isfinite().all())

    @torch.no_grad()
    def step(self, closure=None):
        if self.skipped is None:
            self.skipped = any_rank(not self._grads_finite() or self._loss_nonfinite)
        if self.skipped:
            return None
        return super().step(closure)


class NonFinitePolicy:
    def __init__(self, policy: str, max_consecutive: int) -> None:
        self.policy, self.max_consecutive = policy, max_consecutive
        self.total = 0            # non-finite steps in this launch
        self.consecutive = 0
        self.last_bad = False     # the most recent step was non-finite: never save now
        self.last_finite_step = 0

    def update(self, step: int, bad: bool) -> None:
        self.last_bad = bad
        if bad:
            self.total += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
            self.last_finite_step = step

    def should_abort(self) -> bool:
        return self.policy == "abort" and self.consecutive >= self.max_consecutive

    def abort_message(self, step: int, lr: float) -> str:
        first = step - self.consecutive + 1
        return (f"training diverged: the loss or gradient norm was non-finite (NaN/inf) at "
                f"steps {first}-{step} ({self.consecutive} in a row, "
                f"train.nonfinite_max_consecutive={self.max_consecutive}); those updates were "
                f"not applied and no checkpoint was written after step "
                f"{self.last_finite_step}. Lower optim.lr (now {lr:.3g}), lengthen "
                "optim.warmup_steps, keep optim.grad_clip > 0, or train in fp32 "
                "(train.precision=fp32); resume from the last checkpoint with the new "
                "settings, or set train.nonfinite=skip to train past isolated bad steps")


class SpikeDetector:
    def __init__(self, factor: float, window: int, min_history: int = 5) -> None:
        self.factor, self.min_history = factor, min_history
        self.history: collections.deque[float] = collections.deque(maxlen=window)

    def check(self, loss: float) -> float | None:
        """The running mean when ``loss`` is a spike, else None; finite losses join the
        history (spikes too, so a lasting level shift stops being reported)."""
        if not math.isfinite(loss):
            return None
        mean = sum(self.history) / len(self.history) if self.history else 0.0
        spike = (self.factor > 0 and len(self.history) >= self.min_history and mean > 0
                 and loss > self.factor * mean)
        self.history.append(loss)
        return mean if spike else None
