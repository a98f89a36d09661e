"""The attention seam: every attention call of the model goes through `attention()`.

Implementations are registered by name in `IMPLS`; the model picks one with `ModelConfig.attention_impl`.
All take the same arguments and masking convention, so a Pallas kernel can replace the XLA path without
the model changing:

* q [B, T, N, H], k and v [B, S, K, H] with N a multiple of K (grouped-query attention; K/V are never
  copied per query head);
* q_segment_ids [B, T] and kv_segment_ids [B, S], int32: query i may attend to key j only if both carry
  the same segment id and that id is not 0 (0 marks padding). Distinct positive ids pack several
  sequences in one row;
* causality is by index, with the T queries aligned to the last T of the S keys (query i sits at key
  index i + S - T), which covers full-sequence forwards (S == T) and cached prefill/decode.

Every implementation returns the output and the per-row log-sum-exp of the scaled logits [B, N, T]
(float32, +inf for a row that sees no key), which the FCI computation reuses.

"xla" is plain XLA einsums (materialises [B, N, T, S] logits); "pallas" is the flash-attention kernel of
`attnrl_jax.kernels` (compiled on GPU/TPU, interpreted on CPU), which never holds a T x S array.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from attnrl_jax.typing import Array


def attention_mask(q_segment_ids: Array, kv_segment_ids: Array, q_offsets: Array | None = None) -> Array:
    """Boolean [B, T, S] mask: same non-zero segment and causal.

    Query t of row b sits at key index q_offsets[b] + t; by default every row's queries are aligned to the
    last T keys (q_offsets = S - T).
    """
    t, s = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    if q_offsets is None:
        q_offsets = jnp.full(q_segment_ids.shape[:1], s - t, jnp.int32)
    q_idx = q_offsets[:, None, None] + jnp.arange(t)[None, :, None]
    causal = q_idx >= jnp.arange(s)[None, None, :]  # [B, T, S]
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, T, S]
    return causal & same & (kv_segment_ids[:, None, :] != 0)


def xla_attention(
    q: Array, k: Array, v: Array, q_segment_ids: Array, kv_segment_ids: Array, q_offsets: Array | None = None
) -> tuple[Array, Array]:
    """Softmax attention with float32 logits and softmax, written as plain XLA einsums.

    The G query heads that share a KV head are folded into the query axis ([B, K, G*T, H]), so each score
    matmul is one batched GEMM per (row, KV head) with no copy of K/V; on CPU this layout is about 2x
    faster than contracting with G as a separate batch dimension.
    """
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    qg = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, h)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    logits = jnp.einsum("bkqh,bksh->bkqs", qg, kt, preferred_element_type=jnp.float32) * (h**-0.5)
    logits = logits.reshape(b, kv_heads, g, t, s)
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_offsets)[:, None, None]  # [B, 1, 1, T, S]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    seen = mask.any(axis=-1, keepdims=True)
    lse = jnp.where(seen, jax.nn.logsumexp(logits, axis=-1, keepdims=True), jnp.inf)  # [B, K, G, T, 1]
    # A query with no visible key (a padding row) gets zeros rather than a uniform average.
    probs = jnp.where(mask, jnp.exp(logits - lse), 0.0).reshape(b, kv_heads, g * t, s)
    out = jnp.einsum("bkqs,bksh->bkqh", probs.astype(v.dtype), vt)  # [B, K, G*T, H]
    out = out.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    return out, lse.reshape(b, n, t)


def pallas_attention(
    q: Array, k: Array, v: Array, q_segment_ids: Array, kv_segment_ids: Array, sharder=None
) -> tuple[Array, Array]:
    """The Pallas flash-attention kernel (interpreted where no GPU/TPU compiler is present), run on each
    device's rows and heads under a mesh (`Sharder.per_device`)."""
    from jax.sharding import PartitionSpec as P

    from attnrl_jax.kernels.flash_attention import flash_attention

    if sharder is None or not sharder.active:
        return flash_attention(q, k, v, q_segment_ids, kv_segment_ids)
    b, h = sharder.kernel_axes(q.shape[0], q.shape[2], k.shape[2])
    heads, seg = P(b, None, h, None), P(b, None)
    fn = sharder.per_device(flash_attention, (heads, heads, heads, seg, seg), (heads, P(b, h, None)))
    return fn(q, k, v, q_segment_ids, kv_segment_ids)


IMPLS: dict[str, Callable[..., tuple[Array, Array]]] = {
    "xla": lambda *args, sharder=None: xla_attention(*args),  # XLA partitions it like any einsum
    "pallas": pallas_attention,
}


def attention(
    q: Array,
    k: Array,
    v: Array,
    q_segment_ids: Array,
    kv_segment_ids: Array,
    *,
    impl: str = "xla",
    return_lse: bool = False,
    q_offsets: Array | None = None,
    sharder=None,
):
    """Dispatches to the attention implementation `impl` (see the module docstring for the contract).

    `q_offsets` [B] places each row's queries at key index q_offsets[b] + t (a KV cache with per-row
    lengths); it is served by the XLA path here, the reference for cached decoding (single-token decode
    steps with attention_impl "pallas" go to `kernels/decode_attention.py` from the model's cached path).

    `sharder` (an `attnrl_jax.mesh.Sharder`) runs a kernel on each device's shards under a mesh.

    Returns the output [B, T, N, H], or (output, lse [B, N, T]) with `return_lse`.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; known: {sorted(IMPLS)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of key/value heads {k.shape[2]}")
    if q_offsets is not None:
        out, lse = xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offsets)
    else:
        out, lse = IMPLS[impl](q, k, v, q_segment_ids, kv_segment_ids, sharder=sharder)
    return (out, lse) if return_lse else out
