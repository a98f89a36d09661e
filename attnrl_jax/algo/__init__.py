"""The AttnRL algorithm core as pure functions of arrays plus small explicit state (host-side numpy):
segmentation, branch-point selection, difficulty-aware expansion, tree values and advantages, adaptive
batch size, and the baselines' variants. Each function cites its section of docs/algorithm.md."""

from attnrl_jax.algo.baselines import grpo_advantages
from attnrl_jax.algo.batch_size import BatchSizeSettings, BatchSizeState, init_batch_size, update_batch_size
from attnrl_jax.algo.branching import AtbSettings, atb_branch_points, fci_threshold, prompt_mean_fci
from attnrl_jax.algo.config import AlgoConfig, branch_points
from attnrl_jax.algo.expansion import ExpansionSettings, RunningMean, num_trees, plan_expansion
from attnrl_jax.algo.segmentation import SeparatorTable, Steps, segment
from attnrl_jax.algo.trees import (
    Continuation,
    Path,
    Response,
    build_prompt_trees,
    filter_zero_variance,
    pack_paths,
    prompt_paths,
    valid_token_count,
)

__all__ = [
    "AlgoConfig",
    "AtbSettings",
    "BatchSizeSettings",
    "BatchSizeState",
    "Continuation",
    "ExpansionSettings",
    "Path",
    "Response",
    "RunningMean",
    "SeparatorTable",
    "Steps",
    "atb_branch_points",
    "branch_points",
    "build_prompt_trees",
    "fci_threshold",
    "filter_zero_variance",
    "grpo_advantages",
    "init_batch_size",
    "num_trees",
    "pack_paths",
    "plan_expansion",
    "prompt_mean_fci",
    "prompt_paths",
    "segment",
    "update_batch_size",
    "valid_token_count",
]
