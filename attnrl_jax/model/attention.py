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

The cached forwards' two forms are here too: `prefill_attention` (prefixes among themselves, in query
chunks on the XLA path) and `paged_decode_attention` (the paged decode kernel on each device's rows and
heads, with the attention mass per key step that FCI accumulates while decoding).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from attnrl_jax.kernels.decode_attention import decode_attention
from attnrl_jax.kernels.flash_attention import flash_attention
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
    steps with attention_impl "pallas" take `paged_decode_attention`, the paged decode kernel).

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


def prefill_attention(q, k, v, seg, *, impl: str, chunk: int, sharder=None):
    """Causal attention of T prefix tokens among themselves (q [B, T, N, H], k/v [B, T, K, H]): the flash
    kernel for impl "pallas"; on the XLA path `chunk` queries at a time, so the float32 scores
    are [B, N, chunk, T], never [B, N, T, T]."""
    b, t = seg.shape
    if impl != "xla" or t <= chunk:
        return attention(q, k, v, seg, seg, impl=impl, sharder=sharder)

    n = -(-t // chunk)
    pad = n * chunk - t
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, chunk, *q.shape[2:])
    sp = jnp.pad(seg, ((0, 0), (0, pad))).reshape(b, n, chunk)

    def one(xs):
        qc, sc, i = xs
        return xla_attention(qc, k, v, sc, seg, jnp.full((b,), i * chunk, jnp.int32))[0]

    out = jax.lax.map(one, (qp.swapaxes(0, 1), sp.swapaxes(0, 1), jnp.arange(n)))  # [n, B, chunk, N, H]
    return out.swapaxes(0, 1).reshape(b, n * chunk, *q.shape[2:])[:, :t]


def paged_decode_attention(
    sharder, q, k_pool, v_pool, layer, table, lengths, key_steps, num_steps, tracked=0
):
    """The paged Pallas decode kernel on each device's rows and heads over its shard of the pools
    [X, L, A, page, K H]: (out [B, N, H], mass [X tracked, N, Y, C] or None without key steps). With key
    steps for the first `tracked` rows of each shard only, the kernel runs twice per device: with the mass
    over those rows, without it over the rest (the mass is most of the kernel's arithmetic)."""
    track = key_steps is not None

    def run(q, k_pool, v_pool, layer, table, lengths, *key_steps):
        kp, vp = k_pool[0], v_pool[0]  # this device's shard
        f = tracked if track else 0
        if not track or f == q.shape[0]:
            out, _, mass = decode_attention(
                q,
                kp,
                vp,
                table,
                lengths,
                key_steps[0] if track else None,
                layer,
                num_steps=num_steps if track else 0,
            )
            return (out, mass) if track else (out,)
        # 0 < f < rows (`cached.forward_cached` checks it): the tracked rows with the mass, the rest without.
        out, _, mass = decode_attention(
            q[:f], kp, vp, table[:f], lengths[:f], key_steps[0], layer, num_steps=num_steps
        )
        rest = decode_attention(q[f:], kp, vp, table[f:], lengths[f:], None, layer)[0]
        return jnp.concatenate([out, rest]), mass

    if k_pool.shape[0] != 1 and not sharder.active:
        raise ValueError(f"a pool of {k_pool.shape[0]} shards needs the mesh that splits it")
    args = (q, k_pool, v_pool, jnp.asarray(layer, jnp.int32), table, lengths) + (
        (key_steps,) if track else ()
    )
    if not sharder.active:
        return (*run(*args), None)[:2]
    b, h = sharder.kernel_axes(q.shape[0], q.shape[1], k_pool.shape[4] // q.shape[2])
    if k_pool.shape[0] == 1:
        b = None  # a replicated pool (rows that do not divide the mesh): every device runs every row
    pool = P(b, None, None, None, h)
    in_specs = (P(b, h, None), pool, pool, P(), P(b, None), P(b)) + ((P(b, None, None),) if track else ())
    out_specs = (P(b, h, None),) + ((P(b, h, None, None),) if track else ())
    outs = sharder.per_device(run, in_specs, out_specs)(*args)
    return (*outs, None)[:2]
