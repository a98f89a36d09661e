"""Forward Context Influence (FCI) from q, k and the attention's saved log-sum-exp, in O(L) memory.

docs/algorithm.md section 5.2: with A the causal softmax attention of one layer and head, U_0 the prompt and
U_1..U_S the response steps, and w_i = 1/|U_{s(i)}| (s(i) the step of token i),

  y_c = sum_{a >= c + Delta} (1/(|U_a| |U_c|)) sum_{i in U_a} sum_{j in U_c} A_ij
      = (1/|U_c|) sum_{j in U_c} sum_{i : s(i) >= c + Delta} w_i A_ij.

So each key column j needs one weighted column sum of the softmax probabilities over the queries whose
step is at least s(j) + Delta, and the per-step result is a sum of those column sums weighted by w_j.
A_ij = exp(s_ij - lse_i) is recomputed from q, k and the log-sum-exp that flash attention saved, so no
L x L (or steps x steps) array exists at any point.

The Pallas kernel visits key tiles outside and, for each, the query tiles that can see it, the structure of
a flash backward dK/dV kernel (two forms, `kernels/target.py`: the GPU form loops over query tiles inside
the program, the TPU form makes them a grid axis), and writes the weighted column sums [B, N, S].
`fci_column_sums_xla` computes the same in plain XLA, chunked over queries (the compiled CPU path and the
benchmark baseline of the kernel), and `fci_reference` is the dense formula from explicit attention maps
(tests and benchmarks only). The algorithm-side math (step lengths, the per-step reduction of the column
sums, the zeroing rules, the attention mass while decoding) lives in `attnrl_jax/fci.py`.

Per-token inputs: step ids (0 for the prompt, c >= 1 for response step c, -1 for padding) and step lengths
(|U_{s(i)}|, anything for padding). One sequence per row; queries and keys are the same tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from attnrl_jax.kernels import target as tg
from attnrl_jax.kernels.flash_attention import _dot_t, _fit, _round_up, padded_length

DELTA = 4  # steps at least this many later count (docs/algorithm.md section 5.2)


TRITON_BLOCKS = (64, 64)  # (query tile, key tile) of the GPU form
TPU_BLOCKS = (256, 256)  # of the TPU form: [256, 128] q/k tiles and [256, 256] float32 probabilities


def _colsum_tile(q, lse, qstep, qw, k, kstep, q_start, k_start, scale, delta):
    """sum_i w_i exp(q_i k_j / sqrt(H) - lse_i) over one query tile for one key tile ([1, bk]), counting
    query i for key j iff i >= j, key j has a step and s(i) >= s(j) + delta."""
    bq, bk = q.shape[0], k.shape[0]
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    mask = (q_pos >= k_pos) & (kstep >= 0) & (qstep >= kstep + delta)
    p = jnp.where(mask, jnp.exp(_dot_t(q, k) * scale - lse), 0.0)
    return jnp.sum(p * qw, axis=0, keepdims=True)


def _fci_kernel(q_ref, lse_ref, qstep_ref, qw_ref, k_ref, kstep_ref, out_ref, *, scale, bq, nq, delta):
    """Triton form: one program per (row, head, key tile), looping over the query tiles that see it."""
    jk = pl.program_id(2)
    bk = k_ref.shape[0]
    k, kstep = k_ref[...], kstep_ref[...]  # [bk, H], [1, bk]

    def body(i, colsum):
        qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
        tile = _colsum_tile(
            q_ref[qs, :],
            lse_ref[qs, :],
            qstep_ref[qs, :],
            qw_ref[qs, :],
            k,
            kstep,
            i * bq,
            jk * bk,
            scale,
            delta,
        )
        return colsum + tile

    # Query tiles before this key tile cannot attend to it (causality).
    lo = jnp.clip((jk * bk) // bq, 0, nq)
    out_ref[...] = lax.fori_loop(lo, nq, body, jnp.zeros((1, bk), jnp.float32))


def _fci_kernel_tpu(q_ref, lse_ref, qstep_ref, qw_ref, k_ref, kstep_ref, out_ref, *, scale, delta):
    """TPU form: grid (row, head, key tile, query tile); the column sums accumulate in the output tile,
    which stays in VMEM over the query tiles."""
    jk, iq = pl.program_id(2), pl.program_id(3)
    bq, bk = q_ref.shape[0], k_ref.shape[0]

    @pl.when(iq == 0)
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, jnp.float32)

    @pl.when((iq + 1) * bq > jk * bk)  # the tile's last query is at or after the key tile's first key
    def _():
        out_ref[...] += _colsum_tile(
            q_ref[...],
            lse_ref[...],
            qstep_ref[...],
            qw_ref[...],
            k_ref[...],
            kstep_ref[...],
            iq * bq,
            jk * bk,
            scale,
            delta,
        )


def _fci_call(qh, lse_p, steps, weights, kh, *, bq, bk, delta, target, interpret):
    b, n, lp, h = qh.shape
    g = n // kh.shape[1]
    nq, nk = lp // bq, lp // bk
    args = (qh, lse_p[..., None], steps[:, :, None], weights[:, :, None], kh, steps[:, None, :])
    out_shape = jax.ShapeDtypeStruct((b, n, 1, lp), jnp.float32)
    if target == "tpu":

        def qt(bi, kj, qi):  # query tiles before the key tile repeat the first visible one: no fetch
            return jnp.minimum(jnp.maximum(qi, (kj * bk) // bq), nq - 1)

        return pl.pallas_call(
            functools.partial(_fci_kernel_tpu, scale=h**-0.5, delta=delta),
            grid=(b, n, nk, nq),
            in_specs=[
                pl.BlockSpec((None, None, bq, h), lambda bi, ni, kj, qi: (bi, ni, qt(bi, kj, qi), 0)),
                pl.BlockSpec((None, None, bq, 1), lambda bi, ni, kj, qi: (bi, ni, qt(bi, kj, qi), 0)),
                pl.BlockSpec((None, bq, 1), lambda bi, ni, kj, qi: (bi, qt(bi, kj, qi), 0)),
                pl.BlockSpec((None, bq, 1), lambda bi, ni, kj, qi: (bi, qt(bi, kj, qi), 0)),
                pl.BlockSpec((None, None, bk, h), lambda bi, ni, kj, qi: (bi, ni // g, kj, 0)),
                pl.BlockSpec((None, 1, bk), lambda bi, ni, kj, qi: (bi, 0, kj)),
            ],
            out_specs=pl.BlockSpec((None, None, 1, bk), lambda bi, ni, kj, qi: (bi, ni, 0, kj)),
            out_shape=out_shape,
            compiler_params=tg.compiler_params(
                target, interpret, "parallel", "parallel", "parallel", "arbitrary"
            ),
            interpret=interpret,
            name="fci_column_sums",
        )(*args)
    return pl.pallas_call(
        functools.partial(_fci_kernel, scale=h**-0.5, bq=bq, nq=nq, delta=delta),
        grid=(b, n, nk),
        in_specs=[
            pl.BlockSpec((None, None, lp, h), lambda bi, ni, kj: (bi, ni, 0, 0)),
            pl.BlockSpec((None, None, lp, 1), lambda bi, ni, kj: (bi, ni, 0, 0)),
            pl.BlockSpec((None, lp, 1), lambda bi, ni, kj: (bi, 0, 0)),
            pl.BlockSpec((None, lp, 1), lambda bi, ni, kj: (bi, 0, 0)),
            pl.BlockSpec((None, None, bk, h), lambda bi, ni, kj: (bi, ni // g, kj, 0)),
            pl.BlockSpec((None, 1, bk), lambda bi, ni, kj: (bi, 0, kj)),
        ],
        out_specs=pl.BlockSpec((None, None, 1, bk), lambda bi, ni, kj: (bi, ni, 0, kj)),
        out_shape=out_shape,
        compiler_params=tg.compiler_params(target, interpret),
        interpret=interpret,
        name="fci_column_sums",
    )(*args)


def token_weights(step_ids, step_lens):
    """w_i = 1 / |U_{s(i)}| per token (0 for padding): the weight of a token within its step."""
    valid = step_ids >= 0
    return jnp.where(valid, 1.0 / jnp.maximum(step_lens, 1).astype(jnp.float32), 0.0)


@functools.partial(jax.jit, static_argnames=("delta", "block_q", "block_k", "target", "interpret"))
def fci_column_sums(
    q, k, lse, step_ids, step_lens, *, delta=DELTA, block_q=None, block_k=None, target=None, interpret=None
):
    """Pallas kernel: c[b, n, j] = sum_{i : s(i) >= s(j) + delta, i >= j} w_i exp(q_i k_j / sqrt(H) - lse_i).

    Args:
      q: [B, L, N, H]; k: [B, L, K, H] (grouped-query: each query head reads its KV head).
      lse: [B, N, L] float32 log-sum-exp of the scaled logits (from `flash_attention`).
      step_ids, step_lens: [B, L] per-token step id and step length (see the module docstring).
      delta: the step gap Delta.
      block_q, block_k: tiles (multiples of 8; None: the form's default, `TRITON_BLOCKS` or `TPU_BLOCKS`;
        shrunk for short sequences, L padded).
      target, interpret: as in `flash_attention` (None: the form of the lowering platform).

    Returns:
      [B, N, L] float32 weighted column sums (0 for keys in padding).
    """
    b, length, n, h = q.shape
    kv_heads = k.shape[2]
    if k.shape[:2] != (b, length) or n % kv_heads:
        raise ValueError(
            f"FCI needs q [B, L, N, H] and k [B, L, K, H] with N % K == 0; got {q.shape}, {k.shape}"
        )
    if lse.shape != (b, n, length) or step_ids.shape != (b, length) or step_lens.shape != (b, length):
        raise ValueError(
            f"lse must be [B, N, L]={b, n, length} and step ids/lengths [B, L]; "
            f"got {lse.shape}, {step_ids.shape}, {step_lens.shape}"
        )
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk is not None and (blk <= 0 or blk % 8):
            raise ValueError(f"{name} must be a positive multiple of 8, got {blk}")
    resolved, _ = tg.resolve(target, interpret)

    def blocks(tgt):
        default = TPU_BLOCKS if tgt == "tpu" else TRITON_BLOCKS
        return (block_q or default[0], block_k or default[1])

    # One padded length that every form's tiles divide, so the padding is shared (flash_attention's rule).
    lp = padded_length(length, [x for t in ((resolved,) if resolved else tg.TARGETS) for x in blocks(t)])
    pad = lp - length
    qh = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))
    kh = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))
    # Padded query rows get lse = +inf (probability 0) and step -1.
    lse_p = jnp.pad(
        jnp.where(jnp.isfinite(lse), lse, jnp.inf), ((0, 0), (0, 0), (0, pad)), constant_values=jnp.inf
    )
    steps = jnp.pad(step_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
    weights = jnp.pad(token_weights(step_ids, step_lens), ((0, 0), (0, pad)))

    def build(tgt, interp):
        bq, bk = (_fit(x, lp) for x in blocks(tgt))
        return functools.partial(_fci_call, bq=bq, bk=bk, delta=delta, target=tgt, interpret=interp)

    out = tg.dispatch(build, (qh, lse_p, steps, weights, kh), target, interpret)
    return out[:, :, 0, :length]


def _auto_chunk(batch: int, heads: int, length: int, budget_bytes: int = 16 << 20) -> int:
    """Largest power-of-two query chunk (8..512) whose [B, N, chunk, L] float32 logits fit the budget."""
    chunk = budget_bytes // (4 * batch * heads * length)
    return int(min(512, max(8, 1 << max(int(chunk).bit_length() - 1, 0))))


@functools.partial(jax.jit, static_argnames=("delta", "chunk"))
def fci_column_sums_xla(q, k, lse, step_ids, step_lens, *, delta=DELTA, chunk=None):
    """The same column sums in plain XLA, scanning over query chunks ([B, N, chunk, L] at a time; the
    default chunk keeps that block near 16 MiB)."""
    b, length, n, h = q.shape
    kv_heads = k.shape[2]
    chunk = chunk or _auto_chunk(b, n, length)
    g = n // kv_heads
    lp = _round_up(length, chunk)
    pad = lp - length
    # Padding rows: lse = +inf (probability 0), step -1, weight 0. Slices are taken inside the loop, so no
    # rearranged copy of q is made.
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    lse_p = jnp.pad(
        jnp.where(jnp.isfinite(lse), lse, jnp.inf), ((0, 0), (0, 0), (0, pad)), constant_values=jnp.inf
    )
    steps = jnp.pad(step_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
    weights = jnp.pad(token_weights(step_ids, step_lens), ((0, 0), (0, pad)))
    kstep = step_ids.astype(jnp.int32)
    k_pos = jnp.arange(length)

    def one_chunk(ci, colsum):
        start = ci * chunk
        qb = lax.dynamic_slice_in_dim(qp, start, chunk, axis=1).reshape(b, chunk, kv_heads, g, h)
        lb = lax.dynamic_slice_in_dim(lse_p, start, chunk, axis=2).reshape(b, kv_heads, g, chunk)
        sb = lax.dynamic_slice_in_dim(steps, start, chunk, axis=1)  # [B, C]
        wb = lax.dynamic_slice_in_dim(weights, start, chunk, axis=1)
        logits = jnp.einsum("bckgh,bskh->bkgcs", qb, k, preferred_element_type=jnp.float32) * h**-0.5
        q_pos = start + jnp.arange(chunk)
        mask = (q_pos[:, None] >= k_pos[None, :])[None] & (kstep[:, None, :] >= 0)
        mask &= sb[:, :, None] >= kstep[:, None, :] + delta  # [B, C, L]
        p = jnp.where(mask[:, None, None], jnp.exp(logits - lb[..., None]), 0.0)
        return colsum + jnp.einsum("bkgcs,bc->bkgs", p, wb)

    init = jnp.zeros((b, kv_heads, g, length), jnp.float32)
    colsum = lax.fori_loop(0, lp // chunk, one_chunk, init)
    return colsum.reshape(b, n, length)


# ------------------------------------------------------------------------------------------------------
# Dense reference (tests and benchmarks only): the section 5.2 formula on explicit attention maps.


def fci_reference(attn: np.ndarray, step_ids: np.ndarray, think_step: int, delta: int = DELTA):
    """Section 5.2 from explicit attention probabilities of one sequence.

    Args:
      attn: [L_layers, H_heads, N_tok, N_tok] attention probabilities (rows = queries).
      step_ids: [N_tok] step of each token: 0 prompt, 1..S response steps (no padding).
      think_step: kappa, the step holding the last `</think>`, or -1.
      delta: Delta.

    Returns:
      (y [S + 1] after zeroing and the max over layers and heads, per_head [L, H, S + 1] before zeroing)
    """
    attn = np.asarray(attn, np.float64)
    step_ids = np.asarray(step_ids)
    num = int(step_ids.max()) + 1
    w = np.zeros((num, len(step_ids)))
    for s in range(num):
        members = step_ids == s
        w[s, members] = 1.0 / members.sum()
    step_attn = np.einsum("an,lhnm,cm->lhac", w, attn, w)  # W A W^T: [L, H, S+1, S+1]
    per_head = np.zeros(attn.shape[:2] + (num,))
    for c in range(num):
        per_head[..., c] = np.nansum(step_attn[..., c + delta :, c], axis=-1)
    y = per_head.max(axis=(0, 1))
    y[:2] = 0.0
    if think_step > 0:
        y[think_step:] = 0.0
    return y, per_head
