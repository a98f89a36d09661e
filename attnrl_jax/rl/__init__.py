"""The policy update: PSRL/GRPO loss (section 11) and the jitted train step."""

from attnrl_jax.rl.batch import build_train_batch, paths_to_train_batch
from attnrl_jax.rl.loss import LossConfig, k3_kl, policy_loss
from attnrl_jax.rl.train_step import (
    Microbatching,
    OptimConfig,
    TrainBatch,
    TrainState,
    batch_log_probs,
    init_sharded_train_state,
    init_train_state,
    jit_batch_log_probs,
    jit_train_step,
    make_optimizer,
    plan_microbatches,
    train_step,
)

__all__ = [
    "LossConfig",
    "Microbatching",
    "OptimConfig",
    "TrainBatch",
    "TrainState",
    "batch_log_probs",
    "build_train_batch",
    "init_sharded_train_state",
    "init_train_state",
    "jit_batch_log_probs",
    "jit_train_step",
    "k3_kl",
    "make_optimizer",
    "paths_to_train_batch",
    "plan_microbatches",
    "policy_loss",
    "train_step",
]
