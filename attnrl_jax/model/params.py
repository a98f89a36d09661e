"""The Qwen2 decoder's parameters: shapes, logical axes, initialisation, and the one rule by which a
layer's weights are cast to the compute dtype.

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

import functools

import jax
import jax.numpy as jnp

from attnrl_jax.mesh import Sharder
from attnrl_jax.model.config import ModelConfig
from attnrl_jax.typing import Params, PRNGKey

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


MLP_WEIGHTS = ("gate", "up", "down")


def layer_weights(lp: Params, cfg: ModelConfig) -> Params:
    """One layer's weights as every forward (training, prefill, decode) reads them: in the compute dtype,
    except the MLP's, which stay in their storage dtype because `layers.swiglu` casts them per token chunk
    (so with float32 master weights their gradient adds up over the chunks in float32)."""
    dtype = jnp.dtype(cfg.dtype)
    return {k: p if k in MLP_WEIGHTS else p.astype(dtype) for k, p in lp.items()}
