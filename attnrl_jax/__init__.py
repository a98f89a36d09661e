"""attnrl_jax: AttnRL (attention-guided process-supervised RL for reasoning models) in JAX."""

__version__ = "0.1.0"
