"""The device-side generation loop: prefill shared prefixes once, fork cache rows, decode every row in one
`jax.lax.while_loop`, and accumulate each response's FCI while decoding.

Rows and sources. `src_tokens` [R, P] holds the prefixes to prefill (right-padded, `src_lens` valid
tokens); every generated row b continues source `row_src[b]` after its first `row_prefix_len[b]` tokens.
An initial response is a row whose prefix is its prompt; a tree continuation is a row whose prefix is the
prompt plus the response's first o tokens. Several rows may share a source, and a continuation at a shorter
offset reads the same prefilled cache (the cache of a prefix is a prefix of the cache), so each response is
prefilled once for all of its branch points. Initial and continuation rows mix freely in one call (the
one-step off-policy pipeline of ALGORITHM.md section 10).

RNG. Row b draws its t-th token with fold_in(row_keys[b], t), so a row's tokens depend only on its key,
prefix and the weights, not on the batch it is in (forked and re-prefilled continuations agree).

FCI while decoding (section 5.2, for rows with `row_fci`): feeding response token i computes its attention
row over the cache, which the model reduces to the mass paid to each key step. The mass of the current
query step a is summed; when the step closes (right after a separator token, or at the row's last token)
it is divided by |U_a| |U_c| and added to the FCI sums of every key step c <= a - Delta. The state per row is
[R, layers, heads, C]; steps numbered C - 1 or more share the last bucket (counted in `step_overflow`).
R = 2 segmentations are tracked side by side when `separators` is [V, 2] ("\\n\\n" and the "\\n"
fallback of section 4): a row uses the "\\n\\n" one if it has such a separator, else the "\\n" one.
A response with neither (every token its own step in section 4) is flagged `needs_fallback`.
At the end the sums are maximised over layers and heads and the zeroing rules applied.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from attnrl_jax.kernels.fci import zero_steps
from attnrl_jax.mesh import Sharder
from attnrl_jax.model.config import ModelConfig
from attnrl_jax.model.transformer import KVCache, forward_cached, init_cache, logits_from_hidden
from attnrl_jax.sampling.sampling import SamplingParams, sample_tokens
from attnrl_jax.typing import Array, Params

EOS, LENGTH = 1, 2  # finish reasons (0: still running)


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """Static settings of one compiled loop (hashable).

    Attributes:
      max_new_tokens: tokens sampled per row at most.
      sampling: temperature / top-k / top-p.
      num_steps: C, FCI buckets per row (step 0 is the prompt).
      delta: the FCI step gap Delta.
      pad_id: written after a row finishes.
    """

    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    num_steps: int = 64
    delta: int = 4
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_steps < 2 or self.delta < 1:
            raise ValueError(f"need max_new_tokens >= 1, num_steps >= 2, delta >= 1; got {self}")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "cache",
        "key_steps",
        "cur_token",
        "n_gen",
        "done",
        "fed_final",
        "reason",
        "tokens",
        "logprobs",
        "entropies",
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
class LoopState:
    """Decode state; the FCI fields carry a leading R axis (one per tracked segmentation)."""

    cache: KVCache
    key_steps: Array  # [B, S, R] step id of each cache position (-1: none)
    cur_token: Array  # [B] the last sampled token, fed next
    n_gen: Array  # [B] tokens sampled so far
    done: Array  # [B] the last token has been sampled
    fed_final: Array  # [B] ... and fed (its attention row counted): the row is finished
    reason: Array  # [B] EOS / LENGTH
    tokens: Array  # [B, M]
    logprobs: Array  # [B, M] float32
    entropies: Array  # [B, M] float32
    cur_step: Array  # [B, R] 1-based step of the next response token
    cur_len: Array  # [B, R] tokens of the current step so far
    step_len: Array  # [B, R, C] tokens per step bucket
    cur_mass: Array  # [B, R, L, N, C] attention mass of the current step to each key step
    fci: Array  # [B, R, L, N, C] FCI sums of closed steps
    think_step: Array  # [B, R] step of the last </think>, or -1
    has_sep: Array  # [B, R] a separator of this segmentation occurred


def _first_logits(params, h_src, row_src, row_prefix_len, cfg, sharder):
    """Logits [B, V] for the token after each row's prefix, from the prefill's hidden states."""
    h = h_src[row_src, row_prefix_len - 1]  # [B, D]
    return logits_from_hidden(params, h[:, None], cfg=cfg, sharder=sharder)[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "settings", "sharder"))
def generate(
    params: Params,
    src_tokens: Array,
    src_lens: Array,
    row_src: Array,
    row_prefix_len: Array,
    row_keys: Array,
    row_fci: Array,
    stop_ids: Array,
    separators: Array,
    think_id: Array,
    row_max_new: Array | None = None,
    *,
    cfg: ModelConfig,
    settings: LoopSettings,
    sharder: Sharder | None = None,
) -> dict[str, Array]:
    """Samples every row to EOS/stop or its length limit (module docstring).

    Args:
      params: model parameters.
      src_tokens, src_lens: [R, P] prefixes to prefill and their valid lengths [R].
      row_src, row_prefix_len: [B] source of each row and how many of its tokens the row continues from
        (1 <= row_prefix_len[b] <= src_lens[row_src[b]]).
      row_keys: [B] PRNG keys (one stream per row).
      row_fci: [B] bool, accumulate FCI for this row (initial responses: prefix = prompt only).
      stop_ids: [B, K] token ids that end each row (-1 pads), EOS included.
      separators: [V] bool, the "\\n\\n" separator table (`algo.SeparatorTable.double_newline`), or
        [V, 2] with the "\\n" table as the fallback segmentation.
      think_id: scalar id of `</think>` (-1 for none).
      row_max_new: [B] tokens each row may sample (clipped to 1..max_new_tokens; None: max_new_tokens).
        ALGORITHM.md section 3: a continuation branched at offset o of a response may add
        max_new_tokens - o tokens, so that the response it completes stays within the length limit; what
        it samples up to there equals the official run's continuation cut after generation.
      cfg, settings, sharder: static model config, loop settings and activation sharding.

    Returns:
      dict: tokens [B, M] (pad after the end), logprobs and entropies [B, M] float32, lengths [B] (sampled
      tokens, stop token included), finish_reason [B] (1 eos, 2 length), fci [B, C] float32 (rows with
      row_fci), think_step [B], step_ids [B, M] (1-based step of each response token, -1 after the end),
      num_steps [B], step_overflow [B] (steps merged into the last bucket), needs_fallback [B].
    """
    sharder = sharder or Sharder()
    m, c, delta = settings.max_new_tokens, settings.num_steps, settings.delta
    b = row_src.shape[0]
    r, p = src_tokens.shape
    size = p + m
    layers, heads = cfg.num_layers, cfg.num_heads

    # Prefill every source once, then fork its cache rows for the rows that continue it.
    src_valid = jnp.arange(p)[None, :] < src_lens[:, None]
    h_src, cache_src, _ = forward_cached(
        params, src_tokens, init_cache(cfg, r, size, sharder), cfg=cfg, valid=src_valid, sharder=sharder
    )
    logits = _first_logits(params, h_src, row_src, row_prefix_len, cfg, sharder)
    cache = KVCache(
        sharder.constrain(
            cache_src.k[:, row_src], ("layers", "batch", "cache_length", "act_kv_heads", "head_dim")
        ),
        sharder.constrain(
            cache_src.v[:, row_src], ("layers", "batch", "cache_length", "act_kv_heads", "head_dim")
        ),
        row_prefix_len.astype(jnp.int32),
    )
    seps = separators[:, None] if separators.ndim == 1 else separators  # [V, R]
    nseg = seps.shape[1]
    key_steps = jnp.where(jnp.arange(size)[None, :] < row_prefix_len[:, None], 0, -1).astype(jnp.int32)
    key_steps = jnp.repeat(key_steps[:, :, None], nseg, axis=2)  # [B, S, R]

    def sample(logits, n_gen):
        keys = jax.vmap(jax.random.fold_in)(row_keys, n_gen)
        return sample_tokens(logits, keys, settings.sampling)

    def is_stop(tok):
        return jnp.any(tok[:, None] == stop_ids, axis=1)

    tok, lp, ent = sample(logits, jnp.zeros((b,), jnp.int32))
    rows = jnp.arange(b)
    limit = (
        jnp.full((b,), m, jnp.int32) if row_max_new is None else jnp.clip(row_max_new, 1, m).astype(jnp.int32)
    )
    zeros_lnc = jnp.zeros((b, nseg, layers, heads, c), jnp.float32)
    stop = is_stop(tok)
    state = LoopState(
        cache=cache,
        key_steps=key_steps,
        cur_token=tok,
        n_gen=jnp.ones((b,), jnp.int32),
        done=stop | (limit == 1),
        fed_final=jnp.zeros((b,), bool),
        reason=jnp.where(stop, EOS, jnp.where(limit == 1, LENGTH, 0)).astype(jnp.int32),
        tokens=jnp.full((b, m), settings.pad_id, jnp.int32).at[:, 0].set(tok),
        logprobs=jnp.zeros((b, m), jnp.float32).at[:, 0].set(lp),
        entropies=jnp.zeros((b, m), jnp.float32).at[:, 0].set(ent),
        cur_step=jnp.ones((b, nseg), jnp.int32),
        cur_len=jnp.zeros((b, nseg), jnp.int32),
        step_len=jnp.zeros((b, nseg, c), jnp.int32).at[:, :, 0].set(row_prefix_len[:, None]),
        cur_mass=zeros_lnc,
        fci=zeros_lnc,
        think_step=jnp.full((b, nseg), -1, jnp.int32),
        has_sep=jnp.zeros((b, nseg), bool),
    )

    def body(s: LoopState) -> LoopState:
        active = ~s.fed_final
        bucket = jnp.minimum(s.cur_step, c - 1)  # [B, R]
        pos = s.cache.lengths
        key_steps = s.key_steps.at[rows, pos].set(jnp.where(active[:, None], bucket, -1), mode="drop")
        h, cache, mass = forward_cached(
            params,
            s.cur_token[:, None],
            s.cache,
            cfg=cfg,
            valid=active[:, None],
            key_steps=key_steps,
            num_steps=c,
            sharder=sharder,
        )
        # ---- FCI: the fed token's attention row joins its step; a closing step is added to the sums.
        track = (active & row_fci)[:, None]  # [B, 1]
        mass = jnp.moveaxis(mass[:, :, :, 0], (1, 3), (0, 1))  # [L, B, N, R, C] -> [B, R, L, N, C]
        cur_mass = s.cur_mass + jnp.where(track[..., None, None, None], mass, 0.0)
        step_len = s.step_len + track[..., None] * jax.nn.one_hot(bucket, c, dtype=jnp.int32)
        cur_len = s.cur_len + track
        sep = seps[s.cur_token]  # [B, R]
        close = track & (sep | s.done[:, None])
        key_len = jnp.maximum(step_len, 1).astype(jnp.float32)  # [B, R, C]
        earlier = jnp.arange(c) <= (s.cur_step - delta)[..., None]  # key steps c <= a - Delta
        scale = jnp.where(earlier, 1.0 / (jnp.maximum(cur_len, 1)[..., None] * key_len), 0.0)  # [B, R, C]
        closing = close[..., None, None, None]
        fci = s.fci + jnp.where(closing, cur_mass * scale[:, :, None, None, :], 0.0)
        cur_mass = jnp.where(closing, 0.0, cur_mass)
        think_step = jnp.where(track & (s.cur_token == think_id)[:, None], s.cur_step, s.think_step)
        cur_step = s.cur_step + close
        cur_len = jnp.where(close, 0, cur_len)
        # ---- sample the next token for rows that are still generating.
        gen = active & ~s.done
        logits = logits_from_hidden(params, h, cfg=cfg, sharder=sharder)[:, 0]
        tok, lp, ent = sample(logits, s.n_gen)
        write = jnp.where(gen, s.n_gen, m)  # finished rows write nowhere (dropped)
        n_gen = s.n_gen + gen
        stop = gen & is_stop(tok)
        hit_len = gen & ~stop & (n_gen >= limit)
        return LoopState(
            cache=cache,
            key_steps=key_steps,
            cur_token=jnp.where(gen, tok, s.cur_token),
            n_gen=n_gen,
            done=s.done | stop | hit_len,
            fed_final=s.fed_final | (active & s.done),
            reason=jnp.where(stop, EOS, jnp.where(hit_len, LENGTH, s.reason)),
            tokens=s.tokens.at[rows, write].set(tok, mode="drop"),
            logprobs=s.logprobs.at[rows, write].set(lp, mode="drop"),
            entropies=s.entropies.at[rows, write].set(ent, mode="drop"),
            cur_step=cur_step,
            cur_len=cur_len,
            step_len=step_len,
            cur_mass=cur_mass,
            fci=fci,
            think_step=think_step,
            has_sep=s.has_sep | (track & sep),
        )

    s = jax.lax.while_loop(lambda s: jnp.any(~s.fed_final), body, state)
    # Per row, the "\n\n" segmentation if it has such a separator, else the "\n" fallback if tracked.
    use = jnp.where(s.has_sep[:, 0] | (nseg == 1), 0, 1)

    def pick(x):
        return jnp.take_along_axis(x, use.reshape((b, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]

    offs = row_prefix_len[:, None] + jnp.arange(m)[None, :]
    chosen_steps = jnp.take_along_axis(s.key_steps, use[:, None, None], axis=2)[..., 0]  # [B, S]
    step_ids = jnp.take_along_axis(chosen_steps, jnp.minimum(offs, size - 1), axis=1)
    step_ids = jnp.where(jnp.arange(m)[None, :] < s.n_gen[:, None], step_ids, -1)
    think_step = pick(s.think_step)
    cur_step = pick(s.cur_step)
    fci = zero_steps(pick(s.fci).max(axis=(1, 2)), think_step)
    return {
        "tokens": s.tokens,
        "logprobs": s.logprobs,
        "entropies": s.entropies,
        "lengths": s.n_gen,
        "finish_reason": s.reason,
        "fci": jnp.where(row_fci[:, None], fci, 0.0),
        "think_step": think_step,
        "step_ids": step_ids,
        "num_steps": cur_step - 1,
        "step_overflow": jnp.maximum(cur_step - 1 - (c - 1), 0),
        "needs_fallback": row_fci & ~jnp.any(s.has_sep, axis=1),
    }
