"""The Qwen2 decoder's forward passes as pure functions over the parameter pytree (`model/params.py`).

One skeleton, `decoder`, is every forward's: embedding, rotary tables, the layers under one `lax.scan`
(which keeps compile time flat in depth), final norm. What differs is the layer it runs: the training
forward's (`_train_layer`, optionally with FCI), the paged prefill's and the cached decode's
(`model/cached.py`); all of them read their weights through `params.layer_weights` and share the
projections `qkv` and `out_and_mlp`.

Also here: logits, and the chunked log-probs and entropies of targets (`token_log_probs_from_hidden`),
whose per-position arithmetic (`layers.log_prob_and_entropy`) the sampler shares.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from attnrl_jax.fci import fci_step_sums, step_lengths, zero_steps
from attnrl_jax.mesh import Sharder
from attnrl_jax.model.attention import attention, attention_mask
from attnrl_jax.model.config import ModelConfig
from attnrl_jax.model.layers import (
    apply_rope,
    log_prob_and_entropy,
    over_token_chunks,
    rms_norm,
    rope_cos_sin,
    swiglu,
)
from attnrl_jax.model.params import layer_weights
from attnrl_jax.typing import Array, Params

ACTIVATIONS = ("batch", "length", "act_embed")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["step_ids", "step_lens"],
    meta_fields=["num_steps", "delta"],
)
@dataclasses.dataclass(frozen=True)
class FciSpec:
    """What a forward computes FCI for: per-token step ids and lengths [B, T], the number of step buckets
    (steps past it are merged into the last) and the step gap Delta."""

    step_ids: Array
    step_lens: Array
    num_steps: int
    delta: int


def qkv(cfg: ModelConfig, sharder: Sharder, lp: Params, x: Array, cos: Array, sin: Array):
    """Pre-norm and the rotated q [B, T, N, H], k and v [B, T, K, H] of one layer (weights lp as
    `layer_weights` gives them)."""
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q = jnp.einsum("btd,dnh->btnh", h, lp["q"]) + lp["q_bias"]
    k = jnp.einsum("btd,dkh->btkh", h, lp["k"]) + lp["k_bias"]
    v = jnp.einsum("btd,dkh->btkh", h, lp["v"]) + lp["v_bias"]
    q = sharder.constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", "head_dim"))
    k = sharder.constrain(apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", "head_dim"))
    v = sharder.constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))
    return q, k, v


def out_and_mlp(cfg: ModelConfig, sharder: Sharder, lp: Params, x: Array, a: Array) -> Array:
    """Output projection of the attention a [B, T, N, H], residual, and the MLP block."""
    x = x + jnp.einsum("btnh,nhd->btd", a, lp["o"])
    x = sharder.constrain(x, ACTIVATIONS)
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    x = x + swiglu(h, lp["gate"], lp["up"], lp["down"], chunk=cfg.mlp_chunk)
    return sharder.constrain(x, ACTIVATIONS)


Layer = Callable[..., tuple[Array, object, object]]


def decoder(
    params: Params, tokens: Array, positions: Array, layer: Layer, carry=None, *, cfg, sharder: Sharder
):
    """The decoder skeleton: embedding of tokens [B, T], rotary tables of positions [B, T], then
    `layer(x, carry, lp, li, cos, sin) -> (x, carry, y)` for every layer li under one scan (lp: that layer's
    stored weights, which the layer reads through `layer_weights`; carry: what the layers thread, such as
    the KV pools; y: a per-layer output, stacked [L, ...]), and the final norm.

    Returns (hidden states [B, T, D] in the compute dtype, the final carry, the stacked ys).
    """
    dtype = jnp.dtype(cfg.dtype)
    x = sharder.constrain(jnp.take(params["embed"], tokens, axis=0).astype(dtype), ACTIVATIONS)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)

    def body(c, xs):
        x, carry = c
        x, carry, y = layer(x, carry, xs[0], xs[1], cos, sin)
        return (x, carry), y

    xs = (params["layers"], jnp.arange(cfg.num_layers))
    (x, carry), ys = jax.lax.scan(body, (x, carry), xs)
    return rms_norm(x, params["final_norm"].astype(dtype), cfg.rms_norm_eps), carry, ys


def _train_layer(
    cfg: ModelConfig, sharder: Sharder, x: Array, lp: Params, cos: Array, sin: Array, seg: Array, fci=None
):
    """One decoder layer of the training forward on x [B, T, D]; with an FciSpec also returns this layer's
    per-head FCI sums [B, N, num_steps] (before zeroing)."""
    lp = layer_weights(lp, cfg)
    q, k, v = qkv(cfg, sharder, lp, x, cos, sin)
    a, lse = attention(q, k, v, seg, seg, impl=cfg.attention_impl, return_lse=True, sharder=sharder)
    x = out_and_mlp(cfg, sharder, lp, x, a)
    if fci is None:
        return x, None
    y = fci_step_sums(
        q,
        k,
        lse,
        fci.step_ids,
        fci.step_lens,
        fci.num_steps,
        delta=fci.delta,
        impl=cfg.attention_impl,
        sharder=sharder,
    )
    return x, sharder.constrain(y, ("batch", "act_heads", None))


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    saveable = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == "dots" else None
    return jax.checkpoint(fn, policy=saveable, prevent_cse=False)


def default_positions(segment_ids: Array) -> Array:
    """Per-row positions 0, 1, ... over the non-padding tokens of each segment (padding gets 0).

    Right padding and packed rows both work: the position restarts where the segment id changes.
    """
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return jnp.where(segment_ids != 0, idx - start_idx, 0).astype(jnp.int32)


def _forward(params, tokens, cfg, segment_ids, positions, sharder, fci=None, per_head=False):
    """The training forward: `decoder` with `_train_layer` (rematerialised by `cfg.remat`). Returns (h
    [B, T, D], the running max of the per-head FCI over layers and heads [B, C] or None, per-layer
    per-head FCI [L, B, N, C] or None)."""
    sharder = sharder or Sharder()
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    if positions is None:
        positions = default_positions(segment_ids)
    layer = _remat(functools.partial(_train_layer, cfg, sharder), cfg.remat)

    if fci is None:

        def plain(x, carry, lp, li, cos, sin):
            return layer(x, lp, cos, sin, segment_ids)[0], carry, None

        h, _, _ = decoder(params, tokens, positions, plain, cfg=cfg, sharder=sharder)
        return h, None, None

    def with_fci(x, running, lp, li, cos, sin):
        x, y = layer(x, lp, cos, sin, segment_ids, fci)  # y [B, N, C]
        return x, jnp.maximum(running, y.max(axis=1)), (y if per_head else None)

    running = jnp.zeros((tokens.shape[0], fci.num_steps), jnp.float32)
    return decoder(params, tokens, positions, with_fci, running, cfg=cfg, sharder=sharder)


def hidden_states(
    params: Params,
    tokens: Array,
    *,
    cfg: ModelConfig,
    segment_ids: Array | None = None,
    positions: Array | None = None,
    sharder: Sharder | None = None,
) -> Array:
    """Final normed hidden states [B, T, D] in the compute dtype.

    Args:
      params: parameter pytree (see module docstring).
      tokens: int token ids [B, T].
      cfg: the model config.
      segment_ids: [B, T] int; 0 marks padding, equal positive ids share attention (an attention mask of
        0/1 is a valid value). Default: all ones.
      positions: [B, T] rotary positions. Default: `default_positions(segment_ids)`.
      sharder: logical-axis sharding of the activations; None for no constraints.
    """
    return _forward(params, tokens, cfg, segment_ids, positions, sharder)[0]


def lm_head(params: Params, cfg: ModelConfig) -> Array:
    return params["embed"] if cfg.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(
    params: Params, h: Array, *, cfg: ModelConfig, sharder: Sharder | None = None
) -> Array:
    """Float32 logits [B, T, V] from hidden states [B, T, D]."""
    sharder = sharder or Sharder()
    w = lm_head(params, cfg).astype(h.dtype)
    logits = jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32)
    return sharder.constrain(logits, ("batch", "length", "act_vocab"))


def forward(
    params: Params, tokens: Array, *, cfg: ModelConfig, sharder: Sharder | None = None, **inputs
) -> Array:
    """Float32 logits [B, T, V] of a Qwen2 decoder (`inputs`: segment_ids and positions, as
    `hidden_states`)."""
    h = hidden_states(params, tokens, cfg=cfg, sharder=sharder, **inputs)
    return logits_from_hidden(params, h, cfg=cfg, sharder=sharder)


def token_log_probs_from_hidden(
    params: Params,
    h: Array,
    targets: Array,
    *,
    cfg: ModelConfig,
    temperature: float = 1.0,
    with_entropy: bool = False,
    sharder: Sharder | None = None,
) -> tuple[Array, Array | None]:
    """Float32 log p(targets) [B, T] under softmax(logits / temperature), and the entropy of that
    distribution per position [B, T] (or None without `with_entropy`), from hidden states [B, T, D].

    The one path from hidden states to log-probs (training loss, reference and recomputed log-probs,
    `token_log_probs`, `forward_with_fci(targets=...)`); its per-position arithmetic is
    `layers.log_prob_and_entropy`, which the sampler's behaviour log-probs use too. It never holds the
    [B, T, V] logits: a scan over sequence chunks of `cfg.logits_chunk` tokens computes one chunk's float32
    logits, its log-sum-exp, the target's logit and the entropy, and the chunk is rematerialised in the
    backward pass (`jax.checkpoint`), so the gradient too holds one chunk's logits at a time. At the 1.5B
    shape (V = 151,936) a 9,216-token row's full float32 logits are 5.6 GB; a 512-token chunk's are 0.3 GB.
    Written here rather than taken from a library: the loss needs both the target log-prob and the entropy
    from the same chunk, at the sampler's temperature, under the mesh's vocabulary sharding.
    """
    sharder = sharder or Sharder()
    w = lm_head(params, cfg)
    inv_temp = 1.0 / temperature

    def chunk(hc: Array, tc: Array):
        # Cast per chunk: the head's gradient then adds up over the chunks in its storage dtype.
        logits = jnp.einsum("bcd,vd->bcv", hc, w.astype(hc.dtype), preferred_element_type=jnp.float32)
        logits = sharder.constrain(logits * inv_temp, ("batch", "length", "act_vocab"))
        return log_prob_and_entropy(logits, tc, with_entropy)

    return over_token_chunks(chunk, cfg.logits_chunk, h, targets.astype(jnp.int32))


def token_log_probs(
    params: Params,
    tokens: Array,
    targets: Array,
    *,
    cfg: ModelConfig,
    segment_ids: Array | None = None,
    positions: Array | None = None,
    temperature: float = 1.0,
    sharder: Sharder | None = None,
) -> Array:
    """Float32 log p(targets[b, t] | tokens[b, :t+1]) [B, T] (at `temperature`), without full logits."""
    h = hidden_states(params, tokens, cfg=cfg, segment_ids=segment_ids, positions=positions, sharder=sharder)
    return token_log_probs_from_hidden(params, h, targets, cfg=cfg, temperature=temperature, sharder=sharder)[
        0
    ]


def forward_with_fci(
    params: Params,
    tokens: Array,
    step_ids: Array,
    think_step: Array,
    *,
    cfg: ModelConfig,
    num_steps: int,
    delta: int = 4,
    targets: Array | None = None,
    positions: Array | None = None,
    sharder: Sharder | None = None,
    per_head: bool = False,
) -> dict[str, Array]:
    """One forward pass that returns the logits (or log-probs of `targets`) and every row's step FCI.

    FCI follows docs/algorithm.md section 5.2: for each layer and head, the attention that each step receives
    from steps at least `delta` later (mean over the query and key tokens of each step pair, summed over
    query steps), maximised over all layers and heads, with the zeroing rules applied (the prompt, the
    first response step, and, when a `</think>` is present, its step and everything after).

    Args:
      params, tokens, cfg, positions, sharder: as `forward`; one sequence (prompt + response) per row.
      step_ids: [B, T] per-token step ids: 0 for the prompt, c >= 1 for response step c, -1 for padding
        (padding also masks attention).
      think_step: [B] 1-based step holding the last `</think>`, or -1.
      num_steps: C, the length of the FCI vectors (steps 0..C-1; steps past it merge into bucket C-1).
      delta: the step gap Delta (4).
      targets: [B, T] token ids; when given, "log_probs" [B, T] (float32) replaces "logits".
      per_head: also return "fci_per_head" [L, B, N, C], the per-layer, per-head sums before zeroing.

    Returns:
      dict with "logits" [B, T, V] or "log_probs" [B, T], "fci" [B, C], and optionally "fci_per_head".
    """
    step_ids = step_ids.astype(jnp.int32)
    fci = FciSpec(step_ids, step_lengths(step_ids), num_steps, delta)
    segment_ids = (step_ids >= 0).astype(jnp.int32)
    h, fci_max, fci_layers = _forward(params, tokens, cfg, segment_ids, positions, sharder, fci, per_head)
    out = {"fci": zero_steps(fci_max, think_step)}
    if targets is None:
        out["logits"] = logits_from_hidden(params, h, cfg=cfg, sharder=sharder)
    else:
        out["log_probs"] = token_log_probs_from_hidden(params, h, targets, cfg=cfg, sharder=sharder)[0]
    if per_head:
        out["fci_per_head"] = fci_layers
    return out


def step_attention(params: Params, tokens: Array, step_ids: Array, *, cfg: ModelConfig) -> Array:
    """The step-to-step attention of one sequence per row, every layer and head: [L, B, N, C, C] with C =
    max step id + 1, entry [.., a, c] the attention that step a's tokens pay to step c's tokens, averaged
    over both (W A W^T of docs/algorithm.md section 5.2). FCI is its column sums from `delta` steps below the
    diagonal on, maximised over layers and heads (`forward_with_fci` computes those sums without the
    matrix; tests/model_fci_test.py checks the two agree). For pictures of small inputs (the task report's
    attention map): it holds the dense [T, T] probabilities of each layer.

    Args:
      tokens: [B, T]; step_ids: [B, T], 0 the prompt, 1.. response steps, -1 padding (masked).
    """
    num = int(jnp.max(step_ids)) + 1
    ids = step_ids.astype(jnp.int32)
    seg = (ids >= 0).astype(jnp.int32)
    onehot = (ids[..., None] == jnp.arange(num)).astype(jnp.float32)  # [B, T, C]
    w = onehot / jnp.maximum(onehot.sum(axis=1, keepdims=True), 1.0)  # mean over a step's tokens
    sharder = Sharder()

    def layer(x, carry, lp, li, cos, sin):
        lpw = layer_weights(lp, cfg)
        q, k, v = qkv(cfg, sharder, lpw, x, cos, sin)
        a, lse = attention(q, k, v, seg, seg, impl="xla", return_lse=True)
        kv = jnp.repeat(k, cfg.num_heads // cfg.num_kv_heads, axis=2)
        logits = jnp.einsum("btnh,bsnh->bnts", q, kv, preferred_element_type=jnp.float32)
        logits = logits * (cfg.head_dim**-0.5)
        visible = attention_mask(seg, seg)[:, None]  # [B, 1, T, S]
        probs = jnp.where(visible, jnp.exp(logits - lse[..., None]), 0.0)
        steps = jnp.einsum("btc,bnts,bsd->bncd", w, probs, w)  # [B, N, C, C]
        return out_and_mlp(cfg, sharder, lpw, x, a), carry, steps

    _, _, ys = decoder(params, tokens, default_positions(seg), layer, cfg=cfg, sharder=sharder)
    return ys
