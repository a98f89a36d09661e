"""Choosing the next token: temperature, top-k, top-p and greedy, with the behaviour log-probs.

The returned log-prob is log softmax(logits / temperature) of the chosen token in float32: the model's
distribution at the sampling temperature, which the trainer uses as the behaviour policy (docs/algorithm.md,
"How the project uses this document", item 4). The entropy is that distribution's entropy (TreeRL's
branching criterion). Top-k and top-p only restrict the support that tokens are drawn from.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attnrl_jax.model.layers import log_prob_and_entropy
from attnrl_jax.typing import Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Attributes:
    temperature: 0 means greedy (argmax; log-probs then at temperature 1).
    top_k: keep the k most likely tokens (0: no limit).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0: no limit).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def allowed_logits(scaled: Array, params: SamplingParams) -> Array:
    """The temperature-scaled logits [B, V] with tokens outside top-k / top-p set to -inf."""
    out = scaled
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        kth = jax.lax.top_k(scaled, params.top_k)[0][..., -1:]
        out = jnp.where(scaled >= kth, out, -jnp.inf)
    if params.top_p < 1.0:
        order = jnp.argsort(-out, axis=-1)
        sorted_logits = jnp.take_along_axis(out, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep_sorted = before < params.top_p  # always keeps the most likely token
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(out.shape[0])[:, None], order].set(keep_sorted)
        out = jnp.where(keep, out, -jnp.inf)
    return out


def sample_tokens(logits: Array, keys: Array, params: SamplingParams) -> tuple[Array, Array, Array]:
    """Draws one token per row from float32 logits [B, V] with one PRNG key per row [B].

    Returns (tokens [B] int32, log-probs [B] float32, entropies [B] float32).
    """
    logits = logits.astype(jnp.float32)
    scaled = logits if params.greedy else logits / params.temperature
    if params.greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        tokens = jax.vmap(jax.random.categorical)(keys, allowed_logits(scaled, params))
    tokens = tokens.astype(jnp.int32)
    logp, entropy = log_prob_and_entropy(scaled, tokens)
    return tokens, logp, entropy
