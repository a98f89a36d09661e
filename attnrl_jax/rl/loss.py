"""The PSRL/GRPO policy loss (docs/algorithm.md section 11) as pure functions of per-token arrays.

Per token, with r = exp(clamp(log pi - log pi_old, -20, 20)) and A the token's advantage:

  l_pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));  if A < 0: l_pg = min(l_pg, -A c)   (dual clip)
  l_kl = k3 = exp(d) - d - 1 with d = clamp(log pi_ref - log pi, -20, 20), clamped to [-10, 10]
  l    = l_pg + beta l_kl - entropy_coef H

`objective="reinforce"` replaces l_pg by plain REINFORCE, -A log pi: no ratio, no clip (the same gradient as
the clipped objective's at r = 1, i.e. on the first mini-batch of an on-policy step; a reference for what
the clip and the ratio do to an update, benchmarks/RESULTS.md).

Losses are returned unreduced as a (sum, denominator) pair, so that micro-batches combine into the exact
token-mean of the whole batch (sum of sums over sum of token counts). "seq_mean_token_mean" averages
tokens within each sequence first and counts sequences instead.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from attnrl_jax.typing import Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Attributes:
    clip_low, clip_high: eps_low / eps_high of the PPO ratio clip (0.2 / 0.28, clip-higher).
    dual_clip: c, the cap -A c on the loss of negative-advantage tokens (3.0; 0 switches it off).
    kl_coef: beta of the k3 KL to the reference policy (0.001; 0: no reference needed).
    entropy_coef: weight of the entropy bonus (0).
    aggregation: "token_mean" or "seq_mean_token_mean".
    objective: "ppo_clip" (the loss above) or "reinforce" (-A log pi, no ratio and no clip).
    temperature: the sampling temperature; the update divides its logits by it, so that the ratio compares
      the policy with the behaviour log-probs the sampler computed at that temperature (1.0 in the paper).
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 3.0
    kl_coef: float = 0.001
    entropy_coef: float = 0.0
    aggregation: str = "token_mean"
    temperature: float = 1.0
    objective: str = "ppo_clip"

    def __post_init__(self):
        if self.aggregation not in ("token_mean", "seq_mean_token_mean"):
            raise ValueError(
                f"loss.aggregation must be token_mean or seq_mean_token_mean, got {self.aggregation!r}"
            )
        if self.objective not in ("ppo_clip", "reinforce"):
            raise ValueError(f"loss.objective must be ppo_clip or reinforce, got {self.objective!r}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(
                f"need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}"
            )
        if self.dual_clip and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (or 0 to disable), got {self.dual_clip}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError("kl_coef and entropy_coef must be non-negative")


def policy_loss_terms(
    logp: Array, old_logp: Array, advantages: Array, cfg: LossConfig
) -> tuple[Array, Array]:
    """Per-token clipped policy loss and a 0/1 "clipped" indicator (the clipped branch is active); for the
    "reinforce" objective -A log pi and no clipping."""
    if cfg.objective == "reinforce":
        return -advantages * logp, jnp.zeros_like(logp)
    ratio = jnp.exp(jnp.clip(logp - old_logp, -20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    loss = jnp.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    if cfg.dual_clip:
        cap = -advantages * cfg.dual_clip
        dual = (advantages < 0) & (loss > cap)
        loss = jnp.where(advantages < 0, jnp.minimum(loss, cap), loss)
        is_clipped = is_clipped | dual
    return loss, is_clipped.astype(jnp.float32)


def k3_kl(logp: Array, ref_logp: Array) -> Array:
    """k3 estimator of KL(pi || pi_ref) per token, clamped as in verl's low_var_kl."""
    d = jnp.clip(ref_logp - logp, -20.0, 20.0)
    return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)


def aggregate(values: Array, mask: Array, mode: str) -> tuple[Array, Array]:
    """(sum, denominator) of per-token values [B, T] under `mask` for the aggregation `mode`."""
    mask = mask.astype(jnp.float32)
    if mode == "token_mean":
        return jnp.sum(values * mask), jnp.sum(mask)
    per_seq = jnp.sum(values * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    has_tokens = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
    return jnp.sum(per_seq * has_tokens), jnp.sum(has_tokens)


def policy_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    cfg: LossConfig,
    ref_logp: Array | None = None,
    entropy: Array | None = None,
) -> tuple[Array, Array, dict[str, Array]]:
    """The total loss as (sum, denominator, metric sums), all over the tokens where mask is 1.

    Args:
      logp, old_logp, advantages, mask: [B, T] float32 current and behaviour log-probs, advantages, 0/1.
      cfg: clip, KL and entropy settings.
      ref_logp: [B, T] reference log-probs (required when cfg.kl_coef > 0).
      entropy: [B, T] token entropies (required when cfg.entropy_coef > 0).

    Returns:
      (loss sum, denominator, metrics): divide the sums by the denominator (after adding up micro-batches)
      for the loss; the metrics are token sums of pg loss, kl, clip indicator, ratio and |logp - old_logp|,
      with "tokens" their token count.
    """
    pg, clipped = policy_loss_terms(logp, old_logp, advantages, cfg)
    total = pg
    mask_f = mask.astype(jnp.float32)
    metrics = {
        "pg_loss": jnp.sum(pg * mask_f),
        "clip_frac": jnp.sum(clipped * mask_f),
        "ratio": jnp.sum(jnp.exp(jnp.clip(logp - old_logp, -20.0, 20.0)) * mask_f),
        "tokens": jnp.sum(mask_f),
    }
    if cfg.kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs the reference log-probs")
        kl = k3_kl(logp, ref_logp)
        total = total + cfg.kl_coef * kl
        metrics["kl"] = jnp.sum(kl * mask_f)
    if cfg.entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs the token entropies")
        total = total - cfg.entropy_coef * entropy
        metrics["entropy"] = jnp.sum(entropy * mask_f)
    loss_sum, denom = aggregate(total, mask, cfg.aggregation)
    return loss_sum, denom, metrics
