"""The Qwen2 policy model: config, pure forward, Hugging Face checkpoint I/O."""

from attnrl_jax.model.config import ModelConfig
from attnrl_jax.model.forward import (
    default_positions,
    forward,
    forward_with_fci,
    hidden_states,
    token_log_probs,
)
from attnrl_jax.model.params import count_params, init_params, init_sharded_params, param_axes, param_shapes

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
