"""Qwen2 decoder as pure functions over a parameter pytree.

Parameters (layer weights stacked on a leading L axis so the layers run under one `lax.scan`, which keeps
compile time flat in depth):

  embed       [V, D]          ("vocab", "embed")
  layers/
    attn_norm [L, D]          ("layers", "norm")
    q         [L, D, N, H]    ("layers", "embed", "q_heads", "head_dim")     q_bias [L, N, H]
    k, v      [L, D, K, H]    ("layers", "embed", "kv_heads", "head_dim")    k_bias, v_bias [L, K, H]
    o         [L, N, H, D]    ("layers", "q_heads", "head_dim", "embed")     (no bias in Qwen2)
    mlp_norm  [L, D]
    gate, up  [L, D, F]       ("layers", "embed", "mlp")
    down      [L, F, D]       ("layers", "mlp", "embed")
  final_norm  [D]
  lm_head     [V, D]          ("vocab", "embed"); absent when the embedding is tied
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from attnrl_jax.mesh import Sharder
from attnrl_jax.model.attention import attention
from attnrl_jax.model.config import ModelConfig
from attnrl_jax.model.layers import apply_rope, over_token_chunks, rms_norm, rope_cos_sin, swiglu
from attnrl_jax.typing import Array, Params, PRNGKey

INIT_STD = 0.02  # transformers' Qwen2 initializer_range


def param_shapes(cfg: ModelConfig) -> dict:
    """Shapes of every parameter, in the pytree structure of `init_params`."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {
        "embed": (V, D),
        "layers": {
            "attn_norm": (L, D),
            "q": (L, D, N, H),
            "q_bias": (L, N, H),
            "k": (L, D, K, H),
            "k_bias": (L, K, H),
            "v": (L, D, K, H),
            "v_bias": (L, K, H),
            "o": (L, N, H, D),
            "mlp_norm": (L, D),
            "gate": (L, D, F),
            "up": (L, D, F),
            "down": (L, F, D),
        },
        "final_norm": (D,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (V, D)
    return shapes


_AXES = {
    "embed": ("vocab", "embed"),
    "attn_norm": ("layers", "norm"),
    "q": ("layers", "embed", "q_heads", "head_dim"),
    "q_bias": ("layers", "q_heads", "head_dim"),
    "k": ("layers", "embed", "kv_heads", "head_dim"),
    "k_bias": ("layers", "kv_heads", "head_dim"),
    "v": ("layers", "embed", "kv_heads", "head_dim"),
    "v_bias": ("layers", "kv_heads", "head_dim"),
    "o": ("layers", "q_heads", "head_dim", "embed"),
    "mlp_norm": ("layers", "norm"),
    "gate": ("layers", "embed", "mlp"),
    "up": ("layers", "embed", "mlp"),
    "down": ("layers", "mlp", "embed"),
    "final_norm": ("norm",),
    "lm_head": ("vocab", "embed"),
}


def param_axes(cfg: ModelConfig) -> dict:
    """Logical axis names of every parameter, in the pytree structure of `init_params`."""

    def name(path, _):
        return _AXES[path[-1].key]

    return jax.tree_util.tree_map_with_path(name, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def init_params(cfg: ModelConfig, rng: PRNGKey) -> Params:
    """Random parameters: N(0, 0.02) matrices, zero biases, unit norm scales (as transformers)."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [
        p[-1].key
        for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
    ]
    keys = jax.random.split(rng, len(leaves))
    dtype = jnp.dtype(cfg.param_dtype)
    out = []
    for name, shape, key in zip(paths, leaves, keys):
        if name.endswith("norm"):
            out.append(jnp.ones(shape, dtype))
        elif name.endswith("bias"):
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


def init_sharded_params(cfg: ModelConfig, rng: PRNGKey, sharder: Sharder | None = None) -> Params:
    """`init_params` compiled with the parameters' target shardings, so no device holds a full copy."""
    sharder = sharder or Sharder()
    abstract = jax.eval_shape(functools.partial(init_params, cfg), rng)
    shardings = sharder.tree_shardings(param_axes(cfg), abstract)
    return jax.jit(functools.partial(init_params, cfg), out_shardings=shardings)(rng)


def compute_params(params: Params, cfg: ModelConfig) -> Params:
    """The parameters in the compute dtype: what the sampler and the frozen reference read. With float32
    master weights (param_dtype float32, dtype bfloat16) this is a bfloat16 copy, half the bytes to hold and
    to stream per decode step; with equal dtypes it is `params` itself."""
    dtype = jnp.dtype(cfg.dtype)
    if jnp.dtype(cfg.param_dtype) == dtype:
        return params
    return jax.tree.map(lambda p: p.astype(dtype), params)


def count_params(params_or_shapes) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params_or_shapes))


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


def _qkv(cfg: ModelConfig, sharder: Sharder, lp: Params, x: Array, cos: Array, sin: Array):
    """Pre-norm and the rotated q [B, T, N, H], k and v [B, T, K, H] of one layer."""
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q = jnp.einsum("btd,dnh->btnh", h, lp["q"]) + lp["q_bias"]
    k = jnp.einsum("btd,dkh->btkh", h, lp["k"]) + lp["k_bias"]
    v = jnp.einsum("btd,dkh->btkh", h, lp["v"]) + lp["v_bias"]
    q = sharder.constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", "head_dim"))
    k = sharder.constrain(apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", "head_dim"))
    v = sharder.constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))
    return q, k, v


def _out_and_mlp(cfg: ModelConfig, sharder: Sharder, lp: Params, x: Array, a: Array) -> Array:
    """Output projection of the attention a [B, T, N, H], residual, and the MLP block."""
    x = x + jnp.einsum("btnh,nhd->btd", a, lp["o"])
    x = sharder.constrain(x, ("batch", "length", "act_embed"))
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    x = x + swiglu(h, lp["gate"], lp["up"], lp["down"], chunk=cfg.mlp_chunk)
    return sharder.constrain(x, ("batch", "length", "act_embed"))


_MLP_WEIGHTS = ("gate", "up", "down")


def _layer(
    cfg: ModelConfig, sharder: Sharder, x: Array, lp: Params, cos: Array, sin: Array, seg: Array, fci=None
):
    """One decoder layer on x [B, T, D]; with an FciSpec also returns this layer's per-head FCI sums
    [B, N, num_steps] (before zeroing)."""
    # The MLP weights stay in their storage dtype: `swiglu` casts them per token chunk (its docstring).
    lp = {k: p if k in _MLP_WEIGHTS else p.astype(jnp.dtype(cfg.dtype)) for k, p in lp.items()}
    q, k, v = _qkv(cfg, sharder, lp, x, cos, sin)
    a, lse = attention(q, k, v, seg, seg, impl=cfg.attention_impl, return_lse=True, sharder=sharder)
    x = _out_and_mlp(cfg, sharder, lp, x, a)
    if fci is None:
        return x, None
    from attnrl_jax.kernels.fci import fci_step_sums

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


def _decoder(params, tokens, cfg, segment_ids, positions, sharder, fci=None, per_head=False):
    """Embedding, scanned layers and final norm. Returns (h [B, T, D], running max of the per-head FCI
    over layers and heads [B, C] or None, per-layer per-head FCI [L, B, N, C] or None)."""
    sharder = sharder or Sharder()
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    if positions is None:
        positions = default_positions(segment_ids)
    dtype = jnp.dtype(cfg.dtype)
    x = jnp.take(params["embed"], tokens, axis=0).astype(dtype)  # [B, T, D]
    x = sharder.constrain(x, ("batch", "length", "act_embed"))
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    layer = _remat(functools.partial(_layer, cfg, sharder), cfg.remat)

    if fci is None:

        def body(x, lp):
            return layer(x, lp, cos, sin, segment_ids)[0], None

        x, _ = jax.lax.scan(body, x, params["layers"])
        fci_max = fci_layers = None
    else:

        def body(carry, lp):
            x, running = carry
            x, y = layer(x, lp, cos, sin, segment_ids, fci)  # y [B, N, C]
            return (x, jnp.maximum(running, y.max(axis=1))), (y if per_head else None)

        init = (x, jnp.zeros((tokens.shape[0], fci.num_steps), jnp.float32))
        (x, fci_max), fci_layers = jax.lax.scan(body, init, params["layers"])
    h = rms_norm(x, params["final_norm"].astype(dtype), cfg.rms_norm_eps)
    return h, fci_max, fci_layers


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
    return _decoder(params, tokens, cfg, segment_ids, positions, sharder)[0]


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
    params: Params,
    tokens: Array,
    *,
    cfg: ModelConfig,
    segment_ids: Array | None = None,
    positions: Array | None = None,
    sharder: Sharder | None = None,
) -> Array:
    """Float32 logits [B, T, V] of a Qwen2 decoder (arguments as `hidden_states`)."""
    h = hidden_states(params, tokens, cfg=cfg, segment_ids=segment_ids, positions=positions, sharder=sharder)
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

    The one implementation of log-softmax-and-gather over the vocabulary (training loss, reference and
    recomputed log-probs, `token_log_probs`, `forward_with_fci(targets=...)`). It never holds the
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
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0] - lse
        if not with_entropy:
            return logp, None
        probs = jnp.exp(logits - lse[..., None])
        return logp, lse - jnp.sum(probs * logits, axis=-1)

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

    FCI follows ALGORITHM.md section 5.2: for each layer and head, the attention that each step receives
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
    from attnrl_jax.kernels.fci import step_lengths, zero_steps

    step_ids = step_ids.astype(jnp.int32)
    fci = FciSpec(step_ids, step_lengths(step_ids), num_steps, delta)
    segment_ids = (step_ids >= 0).astype(jnp.int32)
    h, fci_max, fci_layers = _decoder(params, tokens, cfg, segment_ids, positions, sharder, fci, per_head)
    out = {"fci": zero_steps(fci_max, think_step)}
    if targets is None:
        out["logits"] = logits_from_hidden(params, h, cfg=cfg, sharder=sharder)
    else:
        out["log_probs"] = token_log_probs_from_hidden(params, h, targets, cfg=cfg, sharder=sharder)[0]
    if per_head:
        out["fci_per_head"] = fci_layers
    return out


# ------------------------------------------------------------------------------------------------------
# Paged KV cache forward (prefill and decode)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["k", "v", "table", "lengths"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class KVCache:
    """A paged KV cache: keys and values in pages of a pool, and a page table per row.

    k, v: [D, L, P, page, K H] pools: D shards (the mesh's batch split; each shard's rows use its own P
      pages, so every page a row reads is on the row's device), then per layer, pages, positions in a page,
      and the KV heads' values side by side (head k in [k H, (k + 1) H)): one position's keys are one
      contiguous row, so a token's write is a scatter of whole rows in the pool's own layout (on TPU, with
      the KV heads as an axis of their own, the write wanted another tiled layout and XLA copied the whole
      pool between the two around every write, `kernels/decode_attention.py`).
    table: [B, MB] the page (within the row's shard; rows are split over the shards in order, B / D each)
      that holds row b's positions [m page, (m + 1) page); P marks no page. Rows may share pages: tree
      continuations read the pages of their response's prefix instead of copying them.
    lengths: [B] valid positions of each row.

    k and v hold the compute dtype's values, a 16-bit float's as raw uint16 words (`cache_dtype`): `store`
    writes into them and `load` reads them back. XLA's CPU backend does a bfloat16 scatter in float32,
    converting the whole buffer there and back (two float32 copies of the cache per token written: four
    times the cache in temporaries, `benchmarks/scale_memory.py`), and a bitcast around each write is a
    copy there too; an integer scatter is done in place on every backend.
    """

    k: Array
    v: Array
    table: Array
    lengths: Array

    @property
    def page(self) -> int:
        return self.k.shape[3]

    @property
    def pages(self) -> int:
        """Pages per shard (P); a table entry of P names no page."""
        return self.k.shape[2]

    @property
    def shards(self) -> int:
        return self.k.shape[0]

    @property
    def size(self) -> int:
        """Positions a row can address."""
        return self.table.shape[1] * self.page


def pool_spec(sharder: Sharder, shape: tuple[int, ...], kv_heads: int, q_heads: int):
    """The PartitionSpec of a pool [D, L, P, page, K H]: shards over the batch axes, the KV heads' columns
    over their axis only where it splits whole query-head groups with their KV head (`kernel_axes`)."""
    from jax.sharding import PartitionSpec as P

    b = sharder.spec(("batch",), shape[:1])[0]
    _, h = sharder.kernel_axes(shape[0], q_heads, kv_heads)
    return P(b, None, None, None, h)


def cache_dtype(dtype) -> jnp.dtype:
    """The KV cache's storage type for a compute dtype: the 16-bit integer of a 16-bit float (KVCache's
    docstring), else the dtype itself (a float32 scatter is done in place)."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if dtype.itemsize == 2 else dtype


def store(values: Array, buf_dtype, dtype) -> Array:
    """Values in the cache's storage type (`buf_dtype`) for compute `dtype` (KVCache)."""
    values = values.astype(dtype)
    return values if values.dtype == buf_dtype else jax.lax.bitcast_convert_type(values, buf_dtype)


def load(buf: Array, dtype) -> Array:
    """Cache storage read as `dtype` values."""
    dtype = jnp.dtype(dtype)
    return buf if buf.dtype == dtype else jax.lax.bitcast_convert_type(buf, dtype)


def cache_shards(rows: int, sharder: Sharder | None, shards: int | None = None) -> int:
    """How many shards a pool for `rows` rows has: `shards` if given (1, or the mesh's batch split), else
    the mesh's batch split where it divides the rows (each device then holds its rows' pages), else 1 (the
    pool is replicated over the batch axes)."""
    d = (sharder or Sharder()).batch_parallelism()
    if shards is not None:
        if shards not in (1, d) or rows % shards:
            raise ValueError(
                f"a pool of {rows} rows is split 1 or {d} ways (the mesh's batch split), not {shards}"
            )
        return shards
    return d if rows % d == 0 else 1


def empty_cache(
    cfg: ModelConfig,
    rows: int,
    size: int,
    pages: int,
    page: int,
    sharder: Sharder | None = None,
    shards: int | None = None,
) -> KVCache:
    """A pool of `pages` pages of `page` positions per shard (`cache_shards`) for `rows` rows of up to
    `size` positions, with no page assigned to any row (table entries P) and zero lengths."""
    sharder = sharder or Sharder()
    d = cache_shards(rows, sharder, shards)
    shape = (d, cfg.num_layers, pages, page, cfg.num_kv_heads * cfg.head_dim)
    zeros = jnp.zeros(shape, cache_dtype(cfg.dtype))
    if sharder.active:
        spec = pool_spec(sharder, shape, cfg.num_kv_heads, cfg.num_heads)
        zeros = jax.lax.with_sharding_constraint(zeros, jax.sharding.NamedSharding(sharder.mesh, spec))
    mb = -(-size // page)
    table = sharder.constrain(jnp.full((rows, mb), pages, jnp.int32), ("batch", None))
    return KVCache(zeros, zeros, table, jnp.zeros((rows,), jnp.int32))


def init_cache(
    cfg: ModelConfig, batch: int, size: int, sharder: Sharder | None = None, page: int = 16
) -> KVCache:
    """An empty cache of `size` positions per row where every row owns its pages (a contiguous cache)."""
    d = cache_shards(batch, sharder)
    mb, local = -(-size // page), batch // d
    cache = empty_cache(cfg, batch, size, local * mb, page, sharder)
    table = (jnp.arange(batch) % local)[:, None] * mb + jnp.arange(mb)[None, :]
    return dataclasses.replace(cache, table=table.astype(jnp.int32))


def _by_shard(x: Array, d: int) -> Array:
    """[B, ...] -> [D, B / D, ...]: the rows of each shard (rows are split over the shards in order)."""
    return x.reshape((d, x.shape[0] // d) + x.shape[1:])


def write_positions(buf: Array, layer, table: Array, positions: Array, values: Array) -> Array:
    """Writes values [B, T, K, H] (storage type) at positions [B, T] of each row into layer `layer` of a
    pool [D, L, P, page, K H] through the page table [B, MB]; a negative position, one past the table or
    one whose page is P writes nothing."""
    d, pages, page = buf.shape[0], buf.shape[2], buf.shape[3]
    mb = table.shape[1]
    ok = (positions >= 0) & (positions < mb * page)
    blk = jnp.take_along_axis(table, jnp.clip(positions // page, 0, mb - 1), axis=1)
    blk = jnp.where(ok, blk, pages)

    def one(b, blk, off, val):  # b [L, P, page, K H]; blk, off [B/D, T]; val [B/D, T, K H]
        return b.at[layer, blk, off].set(val, mode="drop")

    rows = values.reshape(values.shape[:2] + (-1,))  # [B, T, K H]: a position's keys, one row
    return jax.vmap(one)(buf, _by_shard(blk, d), _by_shard(positions % page, d), _by_shard(rows, d))


def write_pages(buf: Array, layer, ids: Array, values: Array) -> Array:
    """Writes whole pages values [D, M, page, K, H] (storage type) into pages ids [D, M] of each shard of
    layer `layer` of a pool [D, L, P, page, K H]; an id of P writes nothing."""

    def one(b, ids, val):  # b [L, P, page, K H]; ids [M]; val [M, page, K H]
        return b.at[layer, ids].set(val, mode="drop")

    return jax.vmap(one)(buf, ids, values.reshape(values.shape[:3] + (-1,)))


def read_positions(buf: Array, layer, table: Array, kv_heads: int) -> Array:
    """[B, MB page, K, H]: layer `layer` of a pool [D, L, P, page, K H] read through each row's page
    table [B, MB] (storage type; positions without a page hold some page's values, which callers mask)."""
    d, pages, page, kh = buf.shape[0], buf.shape[2], buf.shape[3], buf.shape[4]
    g = jax.vmap(lambda b, t: b[layer][jnp.clip(t, 0, pages - 1)])(buf, _by_shard(table, d))
    # [D, B/D, MB, page, K H] -> [B, S, K, H]: one copy (the gather's) per layer.
    return g.reshape(table.shape[0], table.shape[1] * page, kv_heads, kh // kv_heads)


def forward_cached(
    params: Params,
    tokens: Array,
    cache: KVCache,
    *,
    cfg: ModelConfig,
    valid: Array | None = None,
    key_steps: Array | None = None,
    num_steps: int = 0,
    sharder: Sharder | None = None,
) -> tuple[Array, KVCache, Array | None]:
    """Runs `tokens` [B, T] after each row's cached tokens and appends their keys/values to the cache.

    Token t of row b sits at position cache.lengths[b] + t, in the page the row's table names for it (the
    caller assigns pages); `valid` [B, T] (default: all) marks real tokens (right padding), and each row's
    length grows by its number of valid tokens. Attention is causal over the row's pages: the XLA path of
    the attention seam with per-row query offsets over the pages read through the table, or, for
    single-token decoding with attention_impl "pallas", the paged Pallas decode kernel.

    With `key_steps` [B, S] (the step id of every cache position, -1 for none; or [B, R, S] for R
    segmentations at once; S = cache.size; along a row's positions the ids never decrease and rise by at
    most one per position, as `kernels/decode_attention.py` needs) and `num_steps` C, also returns the
    attention mass that each new token pays to each key step, [L, B, N, T, C] (or [L, B, N, T, R, C])
    summed over the tokens of the step: the per-token rows of the attention matrix that FCI accumulates
    while decoding. key_steps may cover only the first F rows of each of the cache's D shards ([D F, (R,)
    S], in that order): the mass
    is then computed for those rows alone ([L, D F, ...]), the sampler's rows that track FCI.

    Returns:
      (final hidden states [B, T, D], the updated cache, the attention mass or None)
    """
    sharder = sharder or Sharder()
    b, t = tokens.shape
    valid = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
    dtype = jnp.dtype(cfg.dtype)
    positions = cache.lengths[:, None] + jnp.arange(t)[None, :]  # [B, T]
    new_lengths = cache.lengths + valid.sum(axis=1).astype(jnp.int32)
    kv_seg = (jnp.arange(cache.size)[None, :] < new_lengths[:, None]).astype(jnp.int32)  # [B, S]
    q_seg = valid.astype(jnp.int32)
    x = jnp.take(params["embed"], tokens, axis=0).astype(dtype)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    write_pos = jnp.where(valid, positions, -1)  # padding writes nowhere
    track = key_steps is not None
    squeeze = track and key_steps.ndim == 2
    if squeeze:
        key_steps = key_steps[:, None]  # one segmentation
    d = cache.shards
    tracked = key_steps.shape[0] // d if track else 0  # rows of each shard with key steps
    if track and (key_steps.shape[0] % d or not 0 < tracked <= b // d):
        raise ValueError(f"key_steps of {key_steps.shape[0]} rows: not the first rows of each of {d} shards")
    # The tracked rows' indices in the batch: the first `tracked` of each shard's B / D.
    sub = (jnp.arange(d)[:, None] * (b // d) + jnp.arange(tracked)[None, :]).reshape(-1)

    def body(carry, xs):
        x, ck, cv = carry
        lp, li = xs
        lp = jax.tree.map(lambda p: p.astype(dtype), lp)
        q, k, v = _qkv(cfg, sharder, lp, x, cos, sin)
        ck = write_positions(ck, li, cache.table, write_pos, store(k, ck.dtype, dtype))
        cv = write_positions(cv, li, cache.table, write_pos, store(v, cv.dtype, dtype))
        if cfg.attention_impl == "pallas" and t == 1:
            # The paged Pallas decode kernel: reads only the pages below each row's length and returns
            # the per-step attention mass itself. (Rows with no valid token compute values nobody reads.)
            out, mass = _decode_per_device(
                sharder, q[:, 0], ck, cv, li, cache.table, new_lengths, key_steps, num_steps, tracked
            )
            x = _out_and_mlp(cfg, sharder, lp, x, out[:, None])
            return (x, ck, cv), (mass[:, :, None] if track else None)
        k_all = load(read_positions(ck, li, cache.table, cfg.num_kv_heads), dtype)  # [B, S, K, H]
        v_all = load(read_positions(cv, li, cache.table, cfg.num_kv_heads), dtype)
        a, lse = attention(q, k_all, v_all, q_seg, kv_seg, return_lse=True, q_offsets=cache.lengths)
        x = _out_and_mlp(cfg, sharder, lp, x, a)
        rows = (q, k_all, lse, q_seg, kv_seg, cache.lengths)
        if track and tracked < b // d:
            rows = tuple(arr[sub] for arr in rows)
        mass = _step_mass(*rows, key_steps, num_steps) if track else None
        return (x, ck, cv), mass

    xs = (params["layers"], jnp.arange(cfg.num_layers))
    (x, ck, cv), mass = jax.lax.scan(body, (x, cache.k, cache.v), xs)
    if squeeze:
        mass = mass[..., 0, :]
    h = rms_norm(x, params["final_norm"].astype(dtype), cfg.rms_norm_eps)
    return h, KVCache(ck, cv, cache.table, new_lengths), mass


def _prefill_attention(cfg: ModelConfig, sharder: Sharder, q, k, v, seg, chunk: int):
    """Causal attention of T prefix tokens among themselves (q [B, T, N, H], k/v [B, T, K, H]): the flash
    kernel for attention_impl "pallas"; on the XLA path `chunk` queries at a time, so the float32 scores
    are [B, N, chunk, T], never [B, N, T, T]."""
    b, t = seg.shape
    if cfg.attention_impl != "xla" or t <= chunk:
        return attention(q, k, v, seg, seg, impl=cfg.attention_impl, sharder=sharder)
    from attnrl_jax.model.attention import xla_attention

    n = -(-t // chunk)
    pad = n * chunk - t
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, chunk, *q.shape[2:])
    sp = jnp.pad(seg, ((0, 0), (0, pad))).reshape(b, n, chunk)

    def one(xs):
        qc, sc, i = xs
        return xla_attention(qc, k, v, sc, seg, jnp.full((b,), i * chunk, jnp.int32))[0]

    out = jax.lax.map(one, (qp.swapaxes(0, 1), sp.swapaxes(0, 1), jnp.arange(n)))  # [n, B, chunk, N, H]
    return out.swapaxes(0, 1).reshape(b, n * chunk, *q.shape[2:])[:, :t]


def prefill_into_pages(
    params: Params,
    tokens: Array,
    valid: Array,
    cache: KVCache,
    page_ids: Array,
    page_src: Array,
    page_start: Array,
    *,
    cfg: ModelConfig,
    sharder: Sharder | None = None,
    chunk: int = 512,
) -> tuple[Array, KVCache]:
    """Prefills the prefixes `tokens` [R, P] (`valid` [R, P] marks their left-aligned tokens; the R
    prefixes are split over the cache's D shards in order) from position 0, and writes each layer's keys
    and values into whole pages: page page_ids[d, m] of shard d gets positions page_start[d, m] ..
    + page - 1 of the shard's prefix page_src[d, m] (an id of P writes nothing). A prefix's own pages and
    a row's private copy of the page its prefix ends in are both such pages.

    The prefixes attend only to themselves (`_prefill_attention`: the flash kernel, or XLA in query
    chunks), never to the cache, and one layer's [R, P] keys exist at a time. Page tables and lengths are
    the caller's.

    Returns (final hidden states [R, P, D], the cache).
    """
    sharder = sharder or Sharder()
    r, p = tokens.shape
    d, page = cache.shards, cache.page
    dtype = jnp.dtype(cfg.dtype)
    seg = valid.astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (r, p))
    x = sharder.constrain(
        jnp.take(params["embed"], tokens, axis=0).astype(dtype), ("batch", "length", "act_embed")
    )
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    cols = jnp.clip(page_start[..., None] + jnp.arange(page), 0, p - 1)  # [D, M, page]

    def pages_of(kv):  # [R, P, K, H] -> [D, M, page, K, H]
        return jax.vmap(lambda x, s, c: x[s[:, None], c])(_by_shard(kv, d), page_src, cols)

    def body(carry, xs):
        x, ck, cv = carry
        lp, li = xs
        lp = jax.tree.map(lambda w: w.astype(dtype), lp)
        q, k, v = _qkv(cfg, sharder, lp, x, cos, sin)
        x = _out_and_mlp(cfg, sharder, lp, x, _prefill_attention(cfg, sharder, q, k, v, seg, chunk))
        ck = write_pages(ck, li, page_ids, pages_of(store(k, ck.dtype, dtype)))
        cv = write_pages(cv, li, page_ids, pages_of(store(v, cv.dtype, dtype)))
        return (x, ck, cv), None

    (x, ck, cv), _ = jax.lax.scan(body, (x, cache.k, cache.v), (params["layers"], jnp.arange(cfg.num_layers)))
    h = rms_norm(x, params["final_norm"].astype(dtype), cfg.rms_norm_eps)
    return h, KVCache(ck, cv, cache.table, cache.lengths)


def _decode_per_device(sharder, q, k_pool, v_pool, layer, table, lengths, key_steps, num_steps, tracked=0):
    """The paged Pallas decode kernel on each device's rows and heads over its shard of the pools
    [D, L, P, page, K H]: (out [B, N, H], mass [D tracked, N, R, C] or None without key steps). With key
    steps for the first `tracked` rows of each shard only, the kernel runs twice per device: with the mass
    over those rows, without it over the rest (the mass is most of the kernel's arithmetic)."""
    from jax.sharding import PartitionSpec as P

    from attnrl_jax.kernels.decode_attention import decode_attention

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
        # 0 < f < rows (forward_cached checks it): the tracked rows with the mass, the rest without.
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


def _step_mass(q, k_all, lse, q_seg, kv_seg, offsets, key_steps, num_steps):
    """[B, N, T, R, C]: per segmentation r, the sum over the keys of each step of exp(s - lse).

    key_steps [B, R, S] gives R step assignments of the cache; they share one segment sum by offsetting
    segmentation r into buckets [r C, (r + 1) C).
    """
    from attnrl_jax.model.attention import attention_mask

    b, t, n, h = q.shape
    kv_heads = k_all.shape[2]
    key_steps = jnp.swapaxes(key_steps, 1, 2)  # [B, S, R]
    r = key_steps.shape[-1]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k_all, preferred_element_type=jnp.float32) * h**-0.5
    s = s.reshape(b, n, t, -1)
    mask = attention_mask(q_seg, kv_seg, offsets)[:, None]  # [B, 1, T, S]
    p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
    ids = jnp.where(key_steps >= 0, jnp.minimum(key_steps, num_steps - 1), num_steps * r)  # none -> dropped
    ids = jnp.where(key_steps >= 0, ids + num_steps * jnp.arange(r), ids)  # [B, S, R]

    def one_row(p_row, ids_row):  # [N, T, S], [S, R] -> [N, T, R * C]
        values = jnp.repeat(jnp.moveaxis(p_row, -1, 0), r, axis=0)  # [S * R, N, T], key-major like ids
        summed = jax.ops.segment_sum(values, ids_row.reshape(-1), num_segments=num_steps * r + 1)
        return jnp.moveaxis(summed[: num_steps * r], 0, -1)

    return jax.vmap(one_row)(p, ids).reshape(b, n, t, r, num_steps)
