"""The algorithm settings of AttnRL and its baselines, and the branch-point dispatcher.

Defaults follow the official code (docs/algorithm.md, "How the project uses this document"); each paper
variant is a named setting of the pieces (`AtbSettings`, `ExpansionSettings`, `BatchSizeSettings`).
Presets name the methods of paper Tables 1-2 so that they run as settings of one trainer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attnrl_jax.algo.batch_size import BatchSizeSettings
from attnrl_jax.algo.branching import (
    AtbSettings,
    atb_branch_points,
    earliest_branch_points,
    entropy_branch_points,
    random_branch_points,
)
from attnrl_jax.algo.expansion import ExpansionSettings
from attnrl_jax.algo.segmentation import Steps

CRITERIA = ("fci", "entropy", "random", "earliest")


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
    """Attributes:
    estimator: "tree" (process advantages from the trees) or "grpo" (outcome advantages, no branching).
    group_size: G, initial responses per prompt (6).
    continuations: T, continuations per branch point (2).
    branch_criterion: "fci" (ATB), "entropy" (TreeRL), "random" (uniform steps), "earliest" (steps 2, 3).
    fci_delta: Delta, FCI sums attention from steps at least this many steps later (4).
    atb, expansion, batch_size: see those classes.
    grpo_normalize_std: divide GRPO advantages by the group's standard deviation.
    """

    estimator: str = "tree"
    group_size: int = 6
    continuations: int = 2
    branch_criterion: str = "fci"
    fci_delta: int = 4
    atb: AtbSettings = AtbSettings()
    expansion: ExpansionSettings = ExpansionSettings()
    batch_size: BatchSizeSettings = BatchSizeSettings()
    grpo_normalize_std: bool = True

    def __post_init__(self):
        if self.estimator not in ("tree", "grpo"):
            raise ValueError(f"algo.estimator must be 'tree' or 'grpo', got {self.estimator!r}")
        if self.branch_criterion not in CRITERIA:
            raise ValueError(
                f"algo.branch_criterion must be one of {CRITERIA}, got {self.branch_criterion!r}"
            )
        if self.group_size < 1 or self.continuations < 1 or self.fci_delta < 1:
            raise ValueError(f"group_size, continuations and fci_delta must be positive, got {self}")

    def replace(self, **changes) -> AlgoConfig:
        return dataclasses.replace(self, **changes)

    # Presets (paper Tables 1-2 and section 14).
    @classmethod
    def attnrl(cls) -> AlgoConfig:
        """AttnRL: ATB + difficulty-aware expansion + FCI filter of all-correct prompts."""
        return cls()

    @classmethod
    def grpo(cls) -> AlgoConfig:
        return cls(estimator="grpo")

    @classmethod
    def treerl(cls) -> AlgoConfig:
        """TreeRL: the N highest-entropy tokens of every response, every response branched."""
        return cls(branch_criterion="entropy", expansion=ExpansionSettings(mode="all"))

    @classmethod
    def treerl_atb(cls) -> AlgoConfig:
        """TreeRL with ATB: FCI branch points, every response branched."""
        return cls(expansion=ExpansionSettings(mode="all"))

    @classmethod
    def random_branching(cls) -> AlgoConfig:
        return cls(branch_criterion="random", expansion=ExpansionSettings(mode="all"))

    @classmethod
    def attnrl_no_attention_filter(cls) -> AlgoConfig:
        """Table 2: ATB + ADS without attention filtering (all-correct prompts kept and branched)."""
        return cls(expansion=ExpansionSettings(easy_policy="keep"))

    @classmethod
    def attnrl_no_difficulty_expansion(cls) -> AlgoConfig:
        """Table 2: ATB + ADS without difficulty-aware expansion (m(k) = G)."""
        return cls(expansion=ExpansionSettings(tree_count="uniform"))

    @classmethod
    def attnrl_easy_dropped(cls) -> AlgoConfig:
        """Section 4.3: every all-correct prompt dropped."""
        return cls(expansion=ExpansionSettings(easy_policy="drop"))

    @classmethod
    def early_steps(cls) -> AlgoConfig:
        """Branch at the first two steps after the first, no FCI (ICLR-version ablation)."""
        return cls(branch_criterion="earliest")

    @classmethod
    def paper(cls) -> AlgoConfig:
        """AttnRL as the paper text describes it (Round, >=, filter on every prompt, no 512-token rule)."""
        return cls(
            atb=AtbSettings(token_distance=0),
            expansion=ExpansionSettings(rounding="round", filter_strict=False, filter_scope="all"),
            batch_size=BatchSizeSettings(rule="paper"),
        )

    @classmethod
    def preset(cls, name: str) -> AlgoConfig:
        names = [
            "attnrl",
            "grpo",
            "treerl",
            "treerl_atb",
            "random_branching",
            "attnrl_no_attention_filter",
            "attnrl_no_difficulty_expansion",
            "attnrl_easy_dropped",
            "early_steps",
            "paper",
        ]
        if name not in names:
            raise ValueError(f"unknown algorithm preset {name!r}; known: {names}")
        return getattr(cls, name)()


# What each preset is called where a person reads it (the task job's stage 5, its summary and report).
METHOD_NAMES = {
    "attnrl": "AttnRL",
    "grpo": "GRPO",
    "treerl": "TreeRL",
    "treerl_atb": "TreeRL with ATB",
    "random_branching": "random branching",
    "attnrl_no_attention_filter": "AttnRL without the FCI filter",
    "attnrl_no_difficulty_expansion": "AttnRL without difficulty-aware expansion",
    "attnrl_easy_dropped": "AttnRL, all-correct prompts dropped",
    "early_steps": "early-step branching",
    "paper": "AttnRL (paper text)",
}


def method_label(preset: str) -> str:
    return METHOD_NAMES.get(preset, preset)


def branch_points(
    config: AlgoConfig,
    steps: Steps,
    *,
    fci: np.ndarray | None = None,
    entropy: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Sorted branch offsets of one response under `config.branch_criterion` (N = config.atb.num_points).

    Args:
      config: the algorithm settings.
      steps: the response's segmentation.
      fci: [S] step FCI (for "fci").
      entropy: [R] token entropies (for "entropy").
      rng: random source (for "random").
    """
    n = config.atb.num_points
    if config.branch_criterion == "fci":
        if fci is None:
            raise ValueError("branch_criterion 'fci' needs the response's step FCI")
        return atb_branch_points(fci, steps, config.atb)
    if config.branch_criterion == "entropy":
        if entropy is None:
            raise ValueError("branch_criterion 'entropy' needs the response's token entropies")
        return entropy_branch_points(entropy, n)
    if config.branch_criterion == "random":
        if rng is None:
            raise ValueError("branch_criterion 'random' needs an rng")
        return random_branch_points(steps, rng, n)
    return earliest_branch_points(steps, n)
