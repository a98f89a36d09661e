"""Adaptive prompt batch size (docs/algorithm.md section 9; paper section 3.2.2 eq. 10).

The prompt batch size tracks a target number of training sequences B' (= train_batch_size x G x 5 = 1920
in the official run: 64 prompts whose 6 responses are all branched into 5 paths). With B'' the number of
paths that survived all filtering at the latest training step:

  code (default):  B_new = ceil(0.9 B_old + 0.1 floor(B_old B' / B''))
  paper:           B_new = Round(lambda B_old + (1 - lambda) (B' / B'') B_old),  lambda = 0.9

At the first training step the size stays at its initial value (64). When every path was filtered out
(B'' = 0) the ratio is taken with B'' = 1; the result is clamped to [min_size, max_size] so that one empty
step cannot make the next batch unbounded.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import NamedTuple


@dataclasses.dataclass(frozen=True)
class BatchSizeSettings:
    """Attributes:
    initial: prompt batch size at the first training step (64).
    target_paths: B', training sequences wanted per step (1920).
    ema: lambda, the weight of the old size (0.9).
    rule: "code" (floor inside, ceil outside) or "paper" (Round of the real-valued update).
    min_size, max_size: clamp of the result.
    """

    initial: int = 64
    target_paths: int = 1920
    ema: float = 0.9
    rule: str = "code"
    min_size: int = 1
    max_size: int = 1024

    def __post_init__(self):
        if self.rule not in ("code", "paper"):
            raise ValueError(f"batch_size.rule must be 'code' or 'paper', got {self.rule!r}")
        if not 1 <= self.min_size <= self.initial <= self.max_size:
            raise ValueError(f"need 1 <= min_size <= initial <= max_size, got {self}")
        if not 0.0 <= self.ema <= 1.0 or self.target_paths < 1:
            raise ValueError(f"ema must lie in [0, 1] and target_paths be positive, got {self}")


class BatchSizeState(NamedTuple):
    """The size to draw next and the number of training steps seen (checkpointed with the trainer)."""

    size: int
    steps: int = 0


def init_batch_size(settings: BatchSizeSettings) -> BatchSizeState:
    return BatchSizeState(settings.initial, 0)


def update_batch_size(state: BatchSizeState, num_paths: int, settings: BatchSizeSettings) -> BatchSizeState:
    """The state after a training step that kept `num_paths` paths (B'')."""
    steps = state.steps + 1
    if steps == 1:
        return BatchSizeState(settings.initial, steps)
    # Exact rational arithmetic: 0.9 * 64 + 0.1 * 64 must be 64, not 64.00000000000001 (whose ceil is 65).
    b, target, lam = state.size, settings.target_paths, Fraction(str(settings.ema))
    paths = max(int(num_paths), 1)
    if settings.rule == "code":
        new = math.ceil(lam * b + (1 - lam) * ((b * target) // paths))
    else:
        new = math.floor(lam * b + (1 - lam) * Fraction(target, paths) * b + Fraction(1, 2))
    return BatchSizeState(min(max(new, settings.min_size), settings.max_size), steps)
