"""Difficulty-aware exploration: which responses of a prompt become trees (docs/algorithm.md section 7; paper
section 3.2.1 eqs. 8-9).

With k correct initial responses out of G, the number of trees is m(k) = ceil(G exp(-k/G)) in the code
(6, 6, 5, 4, 4, 3, 3 for G = 6) and Round(G exp(-k/G)) in the paper (6, 5, 4, 4, 3, 3, 2). Which ones:

* k = 0 (all wrong): all G.
* 0 < k < G: if k/G >= 0.5, every incorrect response plus m(k) - (G - k) correct ones drawn uniformly
  without replacement; else every correct response plus m(k) - k incorrect ones drawn likewise.
* k = G (all correct): the attention-based filter. R-bar, a cumulative count-weighted running mean of the
  prompt mean FCI F-bar over every all-correct prompt seen so far (the current batch included, added before
  any comparison), decides: if F-bar(q) > R-bar the first m(G) responses in sampling order are branched,
  otherwise the prompt is dropped from training entirely (its initial responses too).

Settings reproduce the variants: the paper's Round and ">=", a filter applied to every prompt (the paper's
reading of eq. 8), branching every response of every prompt (TreeRL, TreeRL with ATB), m(k) = G (without
difficulty-aware expansion), keeping or dropping all all-correct prompts (no attention filter; "all easy
problems filtered").
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class ExpansionSettings:
    """How many and which responses of a prompt are branched.

    Attributes:
      mode: "difficulty" (AttnRL) or "all" (every response of every prompt: TreeRL, TreeRL with ATB).
      tree_count: "exp" for m(k) = G exp(-k/G), or "uniform" for m(k) = G (w/o difficulty-aware expansion).
      rounding: "ceil" (code) or "round" (paper eq. 9, halves rounded up).
      easy_policy: all-correct prompts: "fci_filter" (AttnRL), "keep" (branch the first m(G), no filter) or
        "drop" (drop them all).
      filter_strict: F-bar > R-bar (code) when True, F-bar >= R-bar (paper) when False.
      filter_scope: "all_correct" (code: only all-correct prompts are filtered, and R-bar averages them) or
        "all" (paper eq. 8 read literally: every prompt is filtered against the mean over all prompts).
    """

    mode: str = "difficulty"
    tree_count: str = "exp"
    rounding: str = "ceil"
    easy_policy: str = "fci_filter"
    filter_strict: bool = True
    filter_scope: str = "all_correct"

    def __post_init__(self):
        choices = {
            "mode": ("difficulty", "all"),
            "tree_count": ("exp", "uniform"),
            "rounding": ("ceil", "round"),
            "easy_policy": ("fci_filter", "keep", "drop"),
            "filter_scope": ("all_correct", "all"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"expansion.{name} must be one of {allowed}, got {getattr(self, name)!r}")


def num_trees(k: int, group_size: int, settings: ExpansionSettings = ExpansionSettings()) -> int:
    """m(k): how many of the G responses of a prompt with k correct ones are branched."""
    if not 0 <= k <= group_size:
        raise ValueError(f"k={k} correct responses out of G={group_size}")
    if settings.tree_count == "uniform":
        return group_size
    x = group_size * math.exp(-k / group_size)
    m = math.ceil(x) if settings.rounding == "ceil" else math.floor(x + 0.5)
    return min(max(m, 0), group_size)


class RunningMean(NamedTuple):
    """Cumulative count-weighted mean (the R-bar of the FCI filter). A pytree of two scalars, so it can be
    checkpointed with the train state."""

    total: float = 0.0
    count: int = 0

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def update(self, values) -> RunningMean:
        values = np.asarray(values, np.float64).reshape(-1)
        return RunningMean(self.total + float(values.sum()), self.count + int(values.size))


@dataclasses.dataclass(frozen=True)
class ExpansionPlan:
    """The decisions for one prompt batch.

    Attributes:
      branched: per prompt, the indices (into its G responses) of the responses to branch, ascending.
      dropped: [Q] bool, prompts dropped from training entirely (failed the FCI filter, or dropped easy).
      running_mean: R-bar after this batch (feed it to the next call).
    """

    branched: list[np.ndarray]
    dropped: np.ndarray
    running_mean: RunningMean


def plan_expansion(
    accs: np.ndarray,
    prompt_fci: np.ndarray,
    running_mean: RunningMean,
    rng: np.random.Generator,
    settings: ExpansionSettings = ExpansionSettings(),
) -> ExpansionPlan:
    """Chooses the responses to branch for a batch of Q prompts with G responses each.

    Args:
      accs: [Q, G] 0/1 correctness of the initial responses.
      prompt_fci: [Q] F-bar of each prompt (`branching.prompt_mean_fci`).
      running_mean: R-bar state before this batch.
      rng: draws the random correct/incorrect picks of mixed prompts.
      settings: the variant.
    """
    accs = np.asarray(accs)
    prompt_fci = np.asarray(prompt_fci, np.float64)
    if accs.ndim != 2 or prompt_fci.shape != accs.shape[:1]:
        raise ValueError(f"accs must be [Q, G] and prompt_fci [Q], got {accs.shape} and {prompt_fci.shape}")
    if not np.isin(accs, (0, 1)).all():
        raise ValueError("accs must be 0/1 correctness values")
    q, g = accs.shape
    k = accs.sum(axis=1).astype(int)
    easy = k == g

    # R-bar includes the current batch before any comparison (cumulative, count-weighted).
    in_scope = easy if settings.filter_scope == "all_correct" else np.ones(q, bool)
    filtering = settings.mode == "difficulty" and settings.easy_policy == "fci_filter"
    if filtering:
        running_mean = running_mean.update(prompt_fci[in_scope])
    r_bar = running_mean.mean

    branched, dropped = [], np.zeros(q, bool)
    for i in range(q):
        if settings.mode == "all":
            branched.append(np.arange(g))
            continue
        if filtering and in_scope[i]:
            passes = prompt_fci[i] > r_bar if settings.filter_strict else prompt_fci[i] >= r_bar
            if not passes:
                dropped[i] = True
                branched.append(np.zeros(0, np.int64))
                continue
        if easy[i] and settings.easy_policy == "drop":
            dropped[i] = True
            branched.append(np.zeros(0, np.int64))
            continue
        m = num_trees(int(k[i]), g, settings)
        correct, wrong = np.flatnonzero(accs[i] == 1), np.flatnonzero(accs[i] == 0)
        if k[i] == 0:
            pick = wrong[:m]
        elif k[i] == g:
            pick = np.arange(m)  # the first m in sampling order, not chosen by FCI
        else:
            keep, rest = (wrong, correct) if k[i] / g >= 0.5 else (correct, wrong)
            extra = min(max(m - len(keep), 0), len(rest))
            pick = np.concatenate([keep, rng.choice(rest, size=extra, replace=False)])
        branched.append(np.sort(pick).astype(np.int64))
    return ExpansionPlan(branched, dropped, running_mean)
