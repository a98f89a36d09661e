"""The Qwen2 policy model: config, pure forward, Hugging Face checkpoint I/O."""

from attnrl_jax.model.config import ModelConfig
from attnrl_jax.model.transformer import (
    count_params,
    default_positions,
    forward,
    forward_with_fci,
    hidden_states,
    init_params,
    init_sharded_params,
    param_axes,
    param_shapes,
    token_log_probs,
)

__all__ = [
    "ModelConfig",
    "count_params",
    "default_positions",
    "forward",
    "forward_with_fci",
    "hidden_states",
    "init_params",
    "init_sharded_params",
    "param_axes",
    "param_shapes",
    "token_log_probs",
]
