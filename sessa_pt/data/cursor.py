"""``DataCursor``: the loader state a checkpoint stores (one global sample count).

The count alone fixes every later batch, given the seed and global batch size it was made with;
those two are stored beside it so a resume with different ones is refused instead of silently
replaying or skipping data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DataCursor:
    """Samples consumed by completed global batches, with the seed and G that define them."""

    samples: int = 0
    seed: int = 0
    global_batch_size: int = 1

    def __post_init__(self) -> None:
        if self.global_batch_size <= 0 or self.samples < 0:
            raise ValueError(f"invalid data cursor {self}")
        if self.samples % self.global_batch_size:
            raise ValueError(
                f"cursor {self.samples} is not a multiple of global_batch_size "
                f"{self.global_batch_size}"
            )

    @property
    def step(self) -> int:
        """Optimizer steps completed."""
        return self.samples // self.global_batch_size

    def check_compatible(self, seed: int, global_batch_size: int) -> None:
        """Refuse to resume with a seed or global batch size other than the saved ones."""
        if seed != self.seed or global_batch_size != self.global_batch_size:
            raise ValueError(
                f"the checkpoint's data cursor was saved with seed={self.seed}, "
                f"global_batch_size={self.global_batch_size} but the config has seed={seed}, "
                f"global_batch_size={global_batch_size}: keep them to resume exactly (dp_size "
                "and micro_batch_size may change)"
            )

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DataCursor:
        return cls(samples=int(state["samples"]), seed=int(state["seed"]),
                   global_batch_size=int(state["global_batch_size"]))
