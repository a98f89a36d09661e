"""Outcome-only advantages of the GRPO baseline (docs/algorithm.md section 14).

GRPO gives every token of response i of a prompt the advantage

  A_i = (r_i - mean_j r_j) / (std_j r_j + eps)     (or r_i - mean_j r_j without std normalisation)

with the unbiased (n - 1) standard deviation, as verl computes it; a group of one response gets A = 0.
"""

from __future__ import annotations

import numpy as np


def grpo_advantages(rewards: np.ndarray, normalize_std: bool = True, eps: float = 1e-6) -> np.ndarray:
    """[Q, G] per-response advantages from [Q, G] rewards."""
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [Q, G], got shape {rewards.shape}")
    if rewards.shape[1] < 2:
        return np.zeros_like(rewards)
    centered = rewards - rewards.mean(axis=1, keepdims=True)
    if normalize_std:
        centered = centered / (rewards.std(axis=1, ddof=1, keepdims=True) + eps)
    return centered
