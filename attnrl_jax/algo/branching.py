"""Choosing branch points (docs/algorithm.md sections 5.4, 6 and 14).

AttnRL's Attention-based Tree Branching (ATB, paper section 3.1.3 eq. 7) branches each response at the
earliest steps whose Forward Context Influence (FCI) is in the response's top 20%. The baselines branch at
the highest-entropy tokens (TreeRL), at uniformly random steps, or at the earliest steps. Every selector
returns sorted response-token offsets; the continuation regenerates from that offset, so with ATB the
chosen high-FCI step is itself regenerated (the cut is before the chosen step).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attnrl_jax.algo.segmentation import Steps


@dataclasses.dataclass(frozen=True)
class AtbSettings:
    """Settings of ATB.

    Attributes:
      num_points: N, branch points per response (2).
      quantile: the threshold quantile of the response's FCI (0.8, i.e. the top 20%; paper rho = 0.2).
      token_distance: a chosen step must start at least this many tokens from the start of the sequence
        (prompt included) and lie at least this many tokens from every step already chosen (code only,
        `token_distance=512`). 0 switches the rule off, which is the paper's description.
    """

    num_points: int = 2
    quantile: float = 0.8
    token_distance: int = 512

    def __post_init__(self):
        if self.num_points < 1:
            raise ValueError(f"num_points must be at least 1, got {self.num_points}")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must lie in [0, 1], got {self.quantile}")
        if self.token_distance < 0:
            raise ValueError(f"token_distance must be non-negative, got {self.token_distance}")


def fci_threshold(fci: np.ndarray, quantile: float = 0.8) -> float:
    """tau = the `quantile` of the FCI scores (linear interpolation, zeros included).

    If tau is 0 while some score is positive, tau is the smallest positive score instead, so that a
    response whose scores are mostly zero still has the positive steps as its candidates.
    """
    fci = np.asarray(fci, np.float64)
    tau = float(np.quantile(fci, quantile))
    if tau == 0.0 and (fci > 0).any():
        tau = float(fci[fci > 0].min())
    return tau


def _far_enough(c: int, chosen: list[int], steps: Steps, distance: int) -> bool:
    """The 512-token rule for 0-based response step c (section 6 item 3).

    Its absolute start must be >= distance, and the gap between its token range and each chosen step's
    range (start of the later one minus end of the earlier one) must be >= distance.
    """
    b, p = steps.bounds, steps.prompt_len
    start, end = p + b[c], p + b[c + 1]
    if start < distance:
        return False
    for o in chosen:
        o_start, o_end = p + b[o], p + b[o + 1]
        gap = o_start - end if o_start >= end else start - o_end
        if gap < distance:
            return False
    return True


def atb_branch_points(fci: np.ndarray, steps: Steps, settings: AtbSettings = AtbSettings()) -> np.ndarray:
    """ATB branch offsets of one response (section 6).

    1. tau = `fci_threshold(fci)`; candidates C = {c : y_c >= tau} in increasing step order, without the
       first response step.
    2. Earliest-first greedy: accept c if it passes the token-distance rule; stop after N.
    3. Fallback when fewer than N were accepted: the earliest steps 2, 3, ... whose offsets are not yet
       chosen, without the distance rule; then, if still short, steps 2, 3, ... again (repeats allowed).
    4. Offsets o_c = tokens before step c, sorted ascending.

    A response with a single step (or none) cannot be branched after its first step: it returns an empty
    array (the released code loops forever there, section 17). Otherwise exactly N offsets are returned.

    Args:
      fci: [S] FCI of response steps 1..S (after the zeroing rules of section 5.2).
      steps: the response's segmentation (prompt length included for the absolute-start rule).
      settings: N, quantile and token distance.
    """
    fci = np.asarray(fci, np.float64)
    s = steps.num_steps
    if len(fci) != s:
        raise ValueError(f"fci has {len(fci)} scores but the response has {s} steps")
    if s < 2:
        return np.zeros(0, np.int64)
    n = settings.num_points
    tau = fci_threshold(fci, settings.quantile)
    candidates = [c for c in np.flatnonzero(fci >= tau) if c != 0]  # 0-based; step 1 never branches
    chosen: list[int] = []
    for c in candidates:
        if _far_enough(c, chosen, steps, settings.token_distance):
            chosen.append(int(c))
            if len(chosen) == n:
                break
    offsets = [int(steps.bounds[c]) for c in chosen]
    for c in range(1, s):  # fallback: earliest steps, no distance rule
        if len(offsets) == n:
            break
        if steps.bounds[c] not in offsets:
            offsets.append(int(steps.bounds[c]))
    c = 1
    while len(offsets) < n:  # still short (fewer than N steps after the first): repeat the earliest
        offsets.append(int(steps.bounds[c]))
        c = c + 1 if c + 1 < s else 1
    return np.sort(np.asarray(offsets, np.int64))


def earliest_branch_points(steps: Steps, num_points: int = 2) -> np.ndarray:
    """The "early steps" ablation: branch at steps 2, 3, ... (no FCI), repeating when too few."""
    if steps.num_steps < 2:
        return np.zeros(0, np.int64)
    later = steps.bounds[1:-1]
    return np.sort(np.resize(later, num_points)).astype(np.int64)


def random_branch_points(steps: Steps, rng: np.random.Generator, num_points: int = 2) -> np.ndarray:
    """Random branching: N distinct steps drawn uniformly from steps 2..S (with replacement only when
    there are fewer than N of them)."""
    if steps.num_steps < 2:
        return np.zeros(0, np.int64)
    later = steps.bounds[1:-1]
    pick = rng.choice(len(later), size=num_points, replace=len(later) < num_points)
    return np.sort(later[pick]).astype(np.int64)


def entropy_branch_points(entropy: np.ndarray, num_points: int = 2) -> np.ndarray:
    """TreeRL's branching: the N tokens of highest entropy among positions [0, R-1), branching before
    each (so the chosen token is regenerated); ties go to the earlier position.

    Responses with fewer than N + 1 tokens give fewer (possibly zero) offsets.
    """
    entropy = np.asarray(entropy, np.float64)
    pool = entropy[:-1] if len(entropy) else entropy
    k = min(num_points, len(pool))
    order = np.argsort(-pool, kind="stable")[:k]
    return np.sort(order).astype(np.int64)


def response_mean_fci(fci: np.ndarray) -> float:
    """(1/S) sum_c y_c of one response; zeroed steps count in S; 0 for a response with no steps."""
    fci = np.asarray(fci, np.float64)
    return float(fci.mean()) if len(fci) else 0.0


def prompt_mean_fci(fcis: list[np.ndarray]) -> float:
    """F-bar(q) = (1/G) sum_i (1/S_i) sum_c y_{i,c} (paper eq. 8; section 5.4)."""
    return float(np.mean([response_mean_fci(f) for f in fcis])) if fcis else 0.0
