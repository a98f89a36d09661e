"""FCI's algorithm-side math, in one place (docs/algorithm.md section 5.2): step lengths, the per-step
reduction of the kernel's column sums, the zeroing rules, the attention mass paid to each key step while
decoding, and the incremental accumulation of the sums as a response is sampled.

  y_c = sum_{a >= c + Delta} (1/(|U_a| |U_c|)) sum_{i in U_a} sum_{j in U_c} A_ij

Two ways compute it, and both end here:

* From a whole sequence (the model's forward with FCI, `model.forward.forward_with_fci`): per layer,
  `fci_step_sums` takes the weighted column sums of the attention (the Pallas kernel or its XLA path,
  `kernels/fci.py`) and reduces them per key step; the forward keeps their max over layers and heads and
  `zero_steps` applies the zeroing rules.
* While decoding (the sampler, `sampling/loop.py`): each fed response token's attention row is reduced to
  the mass paid to each key step (the decode kernel's mass output, or `step_mass` on the XLA path); the
  mass of the current query step a is summed, and when the step closes (after a separator, or at the
  row's last token) `accumulate` divides it by |U_a| |U_c| and adds it to the sums of every key step
  c <= a - Delta. `finish` picks the segmentation, maximises over layers and heads and zeroes.

The kernels and their dense references stay in `kernels/`; nothing here is a kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from attnrl_jax.kernels.fci import DELTA, fci_column_sums, fci_column_sums_xla, token_weights
from attnrl_jax.typing import Array

__all__ = [
    "DELTA",
    "FciState",
    "accumulate",
    "fci_step_sums",
    "finish",
    "key_steps_after",
    "reduce_per_step",
    "start_rows",
    "step_lengths",
    "step_mass",
    "zero_steps",
]


def step_lengths(step_ids, num_steps: int | None = None):
    """Per-token |U_{s(i)}| from per-token step ids [B, L] (0 for padding)."""
    length = step_ids.shape[-1]
    n = length + 1 if num_steps is None else num_steps

    def one_row(ids):
        safe = jnp.where(ids >= 0, ids, n)
        counts = jax.ops.segment_sum(jnp.ones_like(ids), safe, num_segments=n + 1)
        return jnp.where(ids >= 0, counts[safe], 0)

    return jax.vmap(one_row)(step_ids)


def reduce_per_step(colsum, step_ids, step_lens, num_steps: int):
    """y[b, n, c] = sum_{j in U_c} w_j colsum[b, n, j] for c < num_steps ([B, N, num_steps]).

    Steps numbered num_steps or more are merged into the last bucket; padding (-1) is dropped.
    """
    w = token_weights(step_ids, step_lens)  # [B, L]
    ids = jnp.where(step_ids >= 0, jnp.minimum(step_ids, num_steps - 1), num_steps)  # padding -> dropped

    def one_row(c, i, wr):  # [N, L], [L], [L]
        return jax.ops.segment_sum((c * wr).T, i, num_segments=num_steps + 1)[:num_steps].T

    return jax.vmap(one_row)(colsum, ids, w)


def fci_step_sums(
    q,
    k,
    lse,
    step_ids,
    step_lens,
    num_steps: int,
    *,
    delta=DELTA,
    impl="pallas",
    interpret=None,
    target=None,
    block_q=None,
    block_k=None,
    sharder=None,
):
    """Per-head FCI sums y^{l,h}_c of one layer, [B, N, num_steps] (before zeroing and max).

    `impl` is "pallas" (the kernel, on each device's rows and heads under `sharder`'s mesh) or "xla"
    (query-chunked XLA).
    """
    if impl == "pallas":
        kernel = functools.partial(
            fci_column_sums, delta=delta, block_q=block_q, block_k=block_k, target=target, interpret=interpret
        )
        if sharder is not None and sharder.active:
            P = PartitionSpec
            b, hd = sharder.kernel_axes(q.shape[0], q.shape[2], k.shape[2])
            heads, rows = P(b, None, hd, None), P(b, None)
            kernel = sharder.per_device(kernel, (heads, heads, P(b, hd, None), rows, rows), P(b, hd, None))
        colsum = kernel(q, k, lse, step_ids, step_lens)
    elif impl == "xla":
        colsum = fci_column_sums_xla(q, k, lse, step_ids, step_lens, delta=delta)
    else:
        raise ValueError(f"unknown FCI implementation {impl!r}; known: 'pallas', 'xla'")
    return reduce_per_step(colsum, step_ids, step_lens, num_steps)


def zero_steps(y, think_step):
    """The zeroing rules of section 5.2 on y [..., C] (step 0 = prompt): y_0 = y_1 = 0, and when the
    think-end step kappa > 0, y_c = 0 for every c >= kappa. `think_step` broadcasts against y[..., 0]."""
    c = jnp.arange(y.shape[-1])
    kappa = jnp.asarray(think_step)[..., None]
    keep = (c >= 2) & ~((kappa > 0) & (c >= kappa))
    return jnp.where(keep, y, 0.0)


# ------------------------------------------------------------------------------------------------------
# While decoding


def step_mass(q, k_all, lse, mask, key_steps, num_steps):
    """[B, N, T, Y, C]: per segmentation r, the sum over the keys of each step of exp(s - lse), the XLA
    path's attention mass (the decode kernel returns the same from its tiles), from q [B, T, N, H], the
    keys k_all [B, S, K, H], the attention's log-sum-exp lse [B, N, T] and its mask [B, T, S].

    key_steps [B, Y, S] gives Y step assignments of the cache; they share one segment sum by offsetting
    segmentation r into buckets [r C, (r + 1) C).
    """
    b, t, n, h = q.shape
    kv_heads = k_all.shape[2]
    key_steps = jnp.swapaxes(key_steps, 1, 2)  # [B, S, Y]
    r = key_steps.shape[-1]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k_all, preferred_element_type=jnp.float32) * h**-0.5
    s = s.reshape(b, n, t, -1)
    p = jnp.where(mask[:, None], jnp.exp(s - lse[..., None]), 0.0)
    ids = jnp.where(key_steps >= 0, jnp.minimum(key_steps, num_steps - 1), num_steps * r)  # none -> dropped
    ids = jnp.where(key_steps >= 0, ids + num_steps * jnp.arange(r), ids)  # [B, S, Y]

    def one_row(p_row, ids_row):  # [N, T, S], [S, Y] -> [N, T, Y * C]
        values = jnp.repeat(jnp.moveaxis(p_row, -1, 0), r, axis=0)  # [S * Y, N, T], key-major like ids
        summed = jax.ops.segment_sum(values, ids_row.reshape(-1), num_segments=num_steps * r + 1)
        return jnp.moveaxis(summed[: num_steps * r], 0, -1)

    return jax.vmap(one_row)(p, ids).reshape(b, n, t, r, num_steps)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "key_steps",
        "cur_step",
        "cur_len",
        "step_len",
        "cur_mass",
        "fci",
        "think_step",
        "has_sep",
    ],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class FciState:
    """FCI while decoding for J rows (the sampler's FCI slots), each tracking Y segmentations at once.

    The sums keep the layout in which the layer scan gives the decode kernel's mass ([L, J, N, Y, C]):
    adding a step's mass needs no transpose of this, the largest per-row state.
    """

    key_steps: Array  # [J, Y, S] step id of each cache position (-1: none)
    cur_step: Array  # [J, Y] 1-based step of the next response token
    cur_len: Array  # [J, Y] tokens of the current step so far
    step_len: Array  # [J, Y, C] tokens per step bucket
    cur_mass: Array  # [L, J, N, Y, C] attention mass of the current step to each key step
    fci: Array  # [L, J, N, Y, C] FCI sums of closed steps
    think_step: Array  # [J, Y] step of the last </think>, or -1
    has_sep: Array  # [J, Y] a separator of this segmentation occurred

    @classmethod
    def empty(cls, rows: int, segs: int, size: int, steps: int, layers: int, heads: int) -> FciState:
        """F = rows rows, none of them started, over a cache of `size` positions and C = steps buckets."""
        sums = jnp.zeros((layers, rows, heads, segs, steps), jnp.float32)
        return cls(
            key_steps=jnp.full((rows, segs, size), -1, jnp.int32),
            cur_step=jnp.ones((rows, segs), jnp.int32),
            cur_len=jnp.zeros((rows, segs), jnp.int32),
            step_len=jnp.zeros((rows, segs, steps), jnp.int32),
            cur_mass=sums,
            fci=sums,
            think_step=jnp.full((rows, segs), -1, jnp.int32),
            has_sep=jnp.zeros((rows, segs), bool),
        )


def start_rows(f: FciState, dest: Array, prefix: Array) -> FciState:
    """f with rows dest [W] (J: none) starting a response after their first prefix [W] cache positions,
    which form step 0 (the prompt) of every segmentation."""
    (nf, nseg, size), c = f.key_steps.shape, f.step_len.shape[2]
    w = dest.shape[0]

    def put(x, v):
        return x.at[dest].set(v, mode="drop")

    fresh = jnp.zeros((nf,), bool).at[dest].set(True, mode="drop")[None, :, None, None, None]
    ks = jnp.where(jnp.arange(size)[None, :] < prefix[:, None], 0, -1).astype(jnp.int32)
    return FciState(
        key_steps=put(f.key_steps, jnp.repeat(ks[:, None, :], nseg, axis=1)),
        cur_step=put(f.cur_step, jnp.ones((w, nseg), jnp.int32)),
        cur_len=put(f.cur_len, jnp.zeros((w, nseg), jnp.int32)),
        step_len=put(f.step_len, jnp.zeros((w, nseg, c), jnp.int32).at[:, :, 0].set(prefix[:, None])),
        cur_mass=jnp.where(fresh, 0.0, f.cur_mass),
        fci=jnp.where(fresh, 0.0, f.fci),
        think_step=put(f.think_step, jnp.full((w, nseg), -1, jnp.int32)),
        has_sep=put(f.has_sep, jnp.zeros((w, nseg), bool)),
    )


def key_steps_after(f: FciState, pos: Array, track: Array) -> Array:
    """The key steps [J, Y, S] once the fed token (at cache position pos [J]) of each tracked row (track
    [J]) joins its row's current step (the last bucket for steps past it)."""
    nf, c = f.key_steps.shape[0], f.step_len.shape[2]
    bucket = jnp.minimum(f.cur_step, c - 1)
    return f.key_steps.at[jnp.arange(nf), :, pos].set(jnp.where(track[:, None], bucket, -1), mode="drop")


def accumulate(
    f: FciState, key_steps, mass, track, token, done, separators, think_id, delta: int
) -> FciState:
    """One decode step: the fed token's attention row (mass [L, J, N, Y, C], over key_steps) joins its
    step for the tracked rows (track [J]); a step that closes (token [J] is a separator of its
    segmentation, separators [V, Y], or the row's last, done [J]) is divided by |U_a| |U_c| and added to
    the sums of every key step c <= a - delta."""
    c = f.step_len.shape[2]
    cur_mass = f.cur_mass + jnp.where(track[None, :, None, None, None], mass, 0.0)
    track = track[:, None]  # [J, 1]
    bucket = jnp.minimum(f.cur_step, c - 1)  # [J, Y]
    step_len = f.step_len + track[..., None] * jax.nn.one_hot(bucket, c, dtype=jnp.int32)
    cur_len = f.cur_len + track
    sep = separators[token]  # [J, Y]
    close = track & (sep | done[:, None])
    key_len = jnp.maximum(step_len, 1).astype(jnp.float32)  # [J, Y, C]
    earlier = jnp.arange(c) <= (f.cur_step - delta)[..., None]  # key steps c <= a - Delta
    scale = jnp.where(earlier, 1.0 / (jnp.maximum(cur_len, 1)[..., None] * key_len), 0.0)  # [J, Y, C]
    closing = close[None, :, None, :, None]  # [1, J, 1, Y, 1] against the sums [L, J, N, Y, C]
    return FciState(
        key_steps=key_steps,
        cur_step=f.cur_step + close,
        cur_len=jnp.where(close, 0, cur_len),
        step_len=step_len,
        cur_mass=jnp.where(closing, 0.0, cur_mass),
        fci=f.fci + jnp.where(closing, cur_mass * scale[None, :, None], 0.0),
        think_step=jnp.where(track & (token == think_id)[:, None], f.cur_step, f.think_step),
        has_sep=f.has_sep | (track & sep),
    )


def finish(f: FciState, prefix: Array, n_gen: Array, max_new: int) -> dict[str, Array]:
    """Each row's results ([J, ...]) from its state (prefix [J] prompt positions, n_gen [J] sampled
    tokens): the "\\n\\n" segmentation (R index 0) if the row has such a separator, else the "\\n"
    fallback where it is tracked; its sums maximised over layers and heads and zeroed (fci [J, C]),
    think_step, step_ids [J, M = max_new] (1-based step of each response token, -1 after the end),
    num_steps, step_overflow (steps merged into the last bucket) and needs_fallback (no separator of
    either segmentation)."""
    nf, nseg, size = f.key_steps.shape
    c = f.step_len.shape[2]
    use = jnp.where(f.has_sep[:, 0] | (nseg == 1), 0, 1)

    def pick(x):
        return jnp.take_along_axis(x, use.reshape((nf, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]

    m = max_new
    offs = prefix[:, None] + jnp.arange(m)[None, :]
    chosen_steps = jnp.take_along_axis(f.key_steps, use[:, None, None], axis=1)[:, 0]  # [J, S]
    step_ids = jnp.take_along_axis(chosen_steps, jnp.minimum(offs, size - 1), axis=1)
    step_ids = jnp.where(jnp.arange(m)[None, :] < n_gen[:, None], step_ids, -1)
    think_step, cur_step = pick(f.think_step), pick(f.cur_step)
    # [L, J, N, Y, C] -> the chosen segmentation's sums (a select, not a gather: the sums keep their one
    # layout), maximised over layers and heads: [J, C]
    which = (jnp.arange(nseg) == use[:, None])[None, :, None, :, None]
    chosen = jnp.where(which, f.fci, 0.0).sum(axis=3)
    return {
        "fci": zero_steps(chosen.max(axis=(0, 2)), think_step),
        "think_step": think_step,
        "step_ids": step_ids,
        "num_steps": cur_step - 1,
        "step_overflow": jnp.maximum(cur_step - 1 - (c - 1), 0),
        "needs_fallback": ~jnp.any(f.has_sep, axis=1),
    }
