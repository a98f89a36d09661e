"""attnrl_jax: AttnRL (attention-guided process-supervised RL for reasoning models) in JAX."""

__version__ = "0.1.0"


class JobError(RuntimeError):
    """A job stopped on purpose, its message saying why and what to do; `train.py` prints it as an error
    line and exits 1 (no traceback)."""
