"""Hugging Face Qwen2 checkpoints: load into (sharded) params, export back.

Loading reads `config.json` and `model.safetensors` (or the shards listed in
`model.safetensors.index.json`). Every parameter is built with `jax.make_array_from_callback`: each device
shard is read from the safetensors files slice by slice (one layer's sub-block at a time) and converted to
our layout, so the loader places each tensor directly onto its target sharding and never holds a full
copy of a tensor beside the sharded one. Before any weight is read, every expected tensor is checked for
presence and shape, and a problem is reported by name with both shapes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from attnrl_jax.mesh import Sharder
from attnrl_jax.model.config import ModelConfig
from attnrl_jax.model.params import param_axes, param_shapes
from attnrl_jax.typing import Params

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Our parameter name -> (Hugging Face tensor name, layout). `{i}` is the layer index.
# Layouts, with transformers' Linear weights stored [out, in]:
#   same:       ours == hf
#   transpose:  ours [in, out] == hf.T                          (MLP)
#   in_heads:   ours [D, N, H] == hf.T reshaped, hf [N*H, D]    (q/k/v weights)
#   heads:      ours [N, H] == hf reshaped, hf [N*H]            (q/k/v biases)
#   heads_out:  ours [N, H, D] == hf.T reshaped, hf [D, N*H]    (o weight)
_LAYER_TENSORS = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", "same"),
    "q": ("model.layers.{i}.self_attn.q_proj.weight", "in_heads"),
    "q_bias": ("model.layers.{i}.self_attn.q_proj.bias", "heads"),
    "k": ("model.layers.{i}.self_attn.k_proj.weight", "in_heads"),
    "k_bias": ("model.layers.{i}.self_attn.k_proj.bias", "heads"),
    "v": ("model.layers.{i}.self_attn.v_proj.weight", "in_heads"),
    "v_bias": ("model.layers.{i}.self_attn.v_proj.bias", "heads"),
    "o": ("model.layers.{i}.self_attn.o_proj.weight", "heads_out"),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", "same"),
    "gate": ("model.layers.{i}.mlp.gate_proj.weight", "transpose"),
    "up": ("model.layers.{i}.mlp.up_proj.weight", "transpose"),
    "down": ("model.layers.{i}.mlp.down_proj.weight", "transpose"),
}
_GLOBAL_TENSORS = {
    "embed": ("model.embed_tokens.weight", "same"),
    "final_norm": ("model.norm.weight", "same"),
    "lm_head": ("lm_head.weight", "same"),
}
# Tensors some checkpoints carry that the model recomputes or never uses.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face shape of one (unstacked) tensor of our `shape`."""
    if layout == "same":
        return shape
    if layout == "transpose":
        return shape[::-1]
    if layout == "in_heads":
        d, n, h = shape
        return (n * h, d)
    if layout == "heads":
        n, h = shape
        return (n * h,)
    if layout == "heads_out":
        n, h, d = shape
        return (d, n * h)
    raise ValueError(layout)


def _read_block(get: Callable, layout: str, shape: tuple[int, ...], idx: tuple[slice, ...]) -> np.ndarray:
    """Reads ours[idx] of one (unstacked) tensor from a safetensors slice `get` (indexable by slices).

    Only the rows/columns that the block needs are read from disk.
    """
    idx = tuple(slice(*s.indices(n)) for s, n in zip(idx, shape))
    if layout == "same":
        return get[idx]
    if layout == "transpose":
        return get[idx[::-1]].T
    if layout == "in_heads":
        (d, n, h), hd = idx, shape[2]
        block = get[n.start * hd : n.stop * hd, d]  # [n*H, d]
        return block.T.reshape(d.stop - d.start, n.stop - n.start, hd)[:, :, h]
    if layout == "heads":
        (n, h), hd = idx, shape[1]
        return get[n.start * hd : n.stop * hd].reshape(n.stop - n.start, hd)[:, h]
    if layout == "heads_out":
        (n, h, d), hd = idx, shape[1]
        block = get[d, n.start * hd : n.stop * hd]  # [d, n*H]
        return block.T.reshape(n.stop - n.start, hd, d.stop - d.start)[:, h, :]
    raise ValueError(layout)


def _to_hf(layout: str, x: np.ndarray) -> np.ndarray:
    """Converts one full (unstacked) tensor from our layout to the Hugging Face one."""
    if layout == "same":
        return x
    if layout == "transpose":
        return np.ascontiguousarray(x.T)
    if layout == "in_heads":
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    if layout == "heads":
        return x.reshape(-1)
    if layout == "heads_out":
        return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
    raise ValueError(layout)


def _damaged(filename: str, e: Exception, tensor: str | None = None) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    where = f", tensor {tensor!r}" if tensor else ""
    return (
        f"{filename}{where}: not a readable safetensors file ({type(e).__name__}: {first}); the file is "
        "damaged or truncated: copy or export it again"
    )


class _SafetensorsDir:
    """Name -> file lookup over a checkpoint directory, with lazily opened safetensors handles."""

    def __init__(self, path: str):
        self.path = path
        self._handles: dict[str, object] = {}
        index_path = os.path.join(path, INDEX_FILE)
        single_path = os.path.join(path, SINGLE_FILE)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index_path}: not a safetensors index with a 'weight_map' ({e})") from None
            missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(path, f))})
            if missing:
                raise FileNotFoundError(f"{index_path} lists shard files that do not exist: {missing}")
            self.files = {name: os.path.join(path, f) for name, f in weight_map.items()}
        elif os.path.isfile(single_path):
            self.files = {name: single_path for name in self.handle(single_path).keys()}
        else:
            raise FileNotFoundError(
                f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; expected a Hugging Face safetensors checkpoint"
            )

    def handle(self, filename: str):
        if filename not in self._handles:
            try:
                self._handles[filename] = safe_open(filename, framework="numpy")
            except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file named either way
                raise ValueError(_damaged(filename, e)) from None
        return self._handles[filename]

    def slice(self, name: str):
        try:
            return self.handle(self.files[name]).get_slice(name)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ValueError(_damaged(self.files[name], e, name)) from None

    def close(self):
        self._handles.clear()


def _expected_tensors(cfg: ModelConfig) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """Hugging Face name -> (our param path, layout, hf shape) for every tensor the model needs."""
    shapes = param_shapes(cfg)
    out = {}
    for key, (template, layout) in _LAYER_TENSORS.items():
        per_layer = shapes["layers"][key][1:]
        for i in range(cfg.num_layers):
            out[template.format(i=i)] = (f"layers/{key}", layout, _hf_shape(layout, per_layer))
    for key, (name, layout) in _GLOBAL_TENSORS.items():
        if key in shapes:
            out[name] = (key, layout, _hf_shape(layout, shapes[key]))
    return out


def _validate(store: _SafetensorsDir, cfg: ModelConfig) -> None:
    expected = _expected_tensors(cfg)
    missing = [name for name in expected if name not in store.files]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"{store.path}: checkpoint is missing tensors required by config.json: {shown}")
    for name, (_, _, shape) in expected.items():
        found = tuple(store.slice(name).get_shape())
        if found != shape:
            raise ValueError(
                f"{store.path}: tensor {name!r} has shape {found}, but config.json implies {shape}"
            )
    unexpected = [n for n in store.files if n not in expected and not _IGNORED.search(n)]
    if cfg.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # transformers ignores it too when the head is tied
    layer_extra = [n for n in unexpected if n.startswith("model.layers.")]
    if layer_extra:
        raise ValueError(
            f"{store.path}: tensors {layer_extra[:3]} do not belong to a {cfg.num_layers}-layer Qwen2; "
            "does config.json match the weights?"
        )
    if unexpected:
        log.warning("%s: ignoring tensors the model does not use: %s", store.path, unexpected[:10])


def load_params(path: str, cfg: ModelConfig, sharder: Sharder | None = None) -> Params:
    """Loads the safetensors weights in `path` into params of `cfg.param_dtype`, placed by `sharder`.

    Args:
      path: a Hugging Face checkpoint directory.
      cfg: the model config (normally `ModelConfig.from_hf_dir(path)`).
      sharder: target shardings by logical axes; None places everything on the first device.
    """
    sharder = sharder or Sharder()
    store = _SafetensorsDir(path)
    _validate(store, cfg)
    shapes = param_shapes(cfg)
    axes = param_axes(cfg)
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))

    def build(key: str, shape: tuple[int, ...], layer_axis: bool) -> jax.Array:
        if layer_axis:
            template, layout = _LAYER_TENSORS[key]
        else:
            template, layout = _GLOBAL_TENSORS[key]
        sharding = sharder.sharding(axes["layers"][key] if layer_axis else axes[key], shape)

        def callback(index: tuple[slice, ...]) -> np.ndarray:
            if not layer_axis:
                return _read_block(store.slice(template), layout, shape, index).astype(dtype)
            layers = range(*index[0].indices(shape[0]))
            blocks = [
                _read_block(store.slice(template.format(i=i)), layout, shape[1:], index[1:]).astype(dtype)
                for i in layers
            ]
            return np.stack(blocks)

        return jax.make_array_from_callback(shape, sharding, callback)

    try:
        params = {
            "embed": build("embed", shapes["embed"], False),
            "layers": {k: build(k, s, True) for k, s in shapes["layers"].items()},
            "final_norm": build("final_norm", shapes["final_norm"], False),
        }
        if "lm_head" in shapes:
            params["lm_head"] = build("lm_head", shapes["lm_head"], False)
    finally:
        store.close()
    return params


def check_tokenizer_vocab(cfg: ModelConfig, tokenizer, source: str = "tokenizer") -> None:
    """Raises if the tokenizer can produce ids that the embedding has no row for."""
    n = len(tokenizer)
    if n > cfg.vocab_size:
        raise ValueError(
            f"{source}: the tokenizer has {n} tokens but the model's vocab_size is {cfg.vocab_size}; "
            "token ids past the embedding would be out of range (config and tokenizer do not match)"
        )


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str, key: str = "tokenizer"):
    """The Hugging Face tokenizer in directory `path` (`key` names where the path came from, for errors).

    Refuses a directory without tokenizer files: transformers would otherwise build an empty tokenizer from
    a bare config.json and the run fail later, about a missing chat template."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{key}={path!r}: no such directory")
    if not has_tokenizer(path):
        raise FileNotFoundError(
            f"{key}={path!r}: no tokenizer files in this directory (expected one of "
            f"{', '.join(TOKENIZER_FILES)} with tokenizer_config.json); copy the tokenizer there or point "
            "config.tokenizer_path at one"
        )
    # (imported here: transformers loads torch where it is installed, about 2 s a process)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a damaged tokenizer file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"{key}={path!r}: the tokenizer does not load ({type(e).__name__}: {first})"
        ) from None


def load_checkpoint(path: str, sharder: Sharder | None = None, **config_overrides):
    """Loads a Hugging Face Qwen2 directory: returns (cfg, params, tokenizer or None).

    The tokenizer, when the directory has one, is loaded with transformers and checked against the
    config's vocabulary size.
    """
    cfg = ModelConfig.from_hf_dir(path, **config_overrides)
    tokenizer = None
    if has_tokenizer(path):
        tokenizer = load_tokenizer(path, "checkpoint")
        check_tokenizer_vocab(cfg, tokenizer, source=path)
    return cfg, load_params(path, cfg, sharder), tokenizer


def _host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def _hf_tensors(cfg: ModelConfig, params: Params):
    """Yields (Hugging Face name, numpy tensor in cfg.param_dtype), one tensor at a time."""
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    for key, (name, layout) in _GLOBAL_TENSORS.items():
        if key in params:
            yield name, _to_hf(layout, _host(params[key]).astype(dtype))
    for key, (template, layout) in _LAYER_TENSORS.items():
        for i in range(cfg.num_layers):
            yield template.format(i=i), _to_hf(layout, _host(params["layers"][key][i]).astype(dtype))


def save_checkpoint(
    path: str,
    cfg: ModelConfig,
    params: Params,
    *,
    tokenizer=None,
    max_shard_bytes: int = 4 << 30,
    overwrite: bool = False,
) -> None:
    """Writes params as a Hugging Face Qwen2ForCausalLM directory that transformers loads.

    Tensors are written in `cfg.param_dtype`, at most `max_shard_bytes` per file (with an index when there
    is more than one file), holding at most one file's tensors in host memory. The directory is assembled
    under a temporary name and renamed into place at the end, so an interrupted export never leaves a
    half-written checkpoint at `path`. In a multi-process run every process must call this (sharded arrays
    are gathered); only process 0 writes.
    """
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
        raise FileExistsError(f"{path}: export destination exists and is not an empty directory")
    writer = jax.process_index() == 0
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent) if writer else None
    try:
        files: list[list[str]] = []  # tensor names per written file
        current: dict[str, np.ndarray] = {}

        def flush():
            if writer:
                save_file(current, os.path.join(tmp, f"part-{len(files)}"), metadata={"format": "pt"})
            files.append(list(current))
            current.clear()

        for name, x in _hf_tensors(cfg, params):
            if current and sum(a.nbytes for a in current.values()) + x.nbytes > max_shard_bytes:
                flush()
            current[name] = x
        flush()
        if not writer:
            return
        _name_files(tmp, files, cfg)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_hf_dict(), f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.exists(path):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _name_files(tmp: str, files: list[list[str]], cfg: ModelConfig) -> None:
    """Gives the written parts (`part-i` in tmp, holding the tensors `files[i]`) their Hugging Face names:
    one `model.safetensors`, or numbered shards with an index naming each tensor's file."""
    if len(files) == 1:
        os.replace(os.path.join(tmp, "part-0"), os.path.join(tmp, SINGLE_FILE))
        return
    weight_map = {}
    for i, names in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(os.path.join(tmp, f"part-{i}"), os.path.join(tmp, final))
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": _tensor_bytes(cfg)}, "weight_map": weight_map}
    with open(os.path.join(tmp, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)


def _tensor_bytes(cfg: ModelConfig) -> int:
    """Total bytes of all tensors in `cfg.param_dtype` (the index's metadata.total_size)."""
    itemsize = jnp.dtype(cfg.param_dtype).itemsize
    leaves = jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    return sum(int(np.prod(s)) for s in leaves) * itemsize
