"""The smoke job: build or load the policy, run a sharded forward, export it, reload it, compare.

This is what `python train.py --config=configs/tiny.py` (`make smoke`) runs: a quick check of the model
alone, beside the trainer. It exercises the foundation on real code paths: config validation, the mesh,
sharded init (or checkpoint loading), the jitted forward with padded rows, Hugging Face export and
re-import.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from attnrl_jax import run_record
from attnrl_jax.mesh import MeshConfig, Sharder, make_mesh
from attnrl_jax.model import ModelConfig, count_params, init_sharded_params, token_log_probs
from attnrl_jax.model.hf_io import load_checkpoint, save_checkpoint
from attnrl_jax.settings import model_config, model_overrides


def validate(c: ConfigDict) -> tuple[ModelConfig, MeshConfig]:
    """Checks every setting before any heavy work; raises ValueError/FileNotFoundError naming the key."""
    run_record.check_workdir(c.workdir)
    if c.model.hf_path and not os.path.isdir(c.model.hf_path):
        raise FileNotFoundError(f"config.model.hf_path={c.model.hf_path!r}: no such directory")
    for key in ("batch_size", "seq_len", "iters"):
        if c.smoke[key] < 1:
            raise ValueError(f"config.smoke.{key} must be at least 1, got {c.smoke[key]}")
    mesh_cfg = MeshConfig(**c.mesh)
    mesh_cfg.resolve(jax.device_count())
    return model_config(c), mesh_cfg


def synthetic_batch(rng: np.random.Generator, vocab: int, batch: int, length: int):
    """Random tokens with random right padding; row 0 is always full length."""
    tokens = rng.integers(0, vocab, (batch, length), dtype=np.int32)
    lengths = rng.integers(max(1, length // 2), length + 1, batch)
    lengths[0] = length
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    return tokens * mask, mask


def run(c: ConfigDict) -> dict:
    cfg, mesh_cfg = validate(c)
    mesh = make_mesh(mesh_cfg)
    sharder = Sharder(mesh)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}, mesh {dict(mesh.shape)}")

    if c.model.hf_path:
        cfg, params, tokenizer = load_checkpoint(c.model.hf_path, sharder, **model_overrides(c))
    else:
        params, tokenizer = init_sharded_params(cfg, jax.random.key(c.seed), sharder), None
    print(f"model: {count_params(params):,} parameters, {cfg.num_layers} layers, {cfg.param_dtype} params")

    tokens, mask = synthetic_batch(
        np.random.default_rng(c.seed), cfg.vocab_size, c.smoke.batch_size, c.smoke.seq_len
    )
    batch_sharding = sharder.sharding(("batch", "length"), tokens.shape)
    tokens, mask = jax.device_put(tokens, batch_sharding), jax.device_put(mask, batch_sharding)

    @functools.partial(jax.jit, static_argnames=("cfg",))
    def nll(params, tokens, mask, cfg):
        targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # the last column is not scored
        tok_logp = token_log_probs(params, tokens, targets, cfg=cfg, segment_ids=mask, sharder=sharder)
        valid = jnp.concatenate([mask[:, 1:] * mask[:, :-1], jnp.zeros_like(mask[:, :1])], axis=1)
        return -(tok_logp * valid).sum() / valid.sum(), tok_logp

    t0 = time.perf_counter()
    loss, logp = jax.block_until_ready(nll(params, tokens, mask, cfg))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in tqdm(range(c.smoke.iters), desc="forward", unit="batch"):
        loss, logp = nll(params, tokens, mask, cfg)
    jax.block_until_ready(loss)
    per_iter = (time.perf_counter() - t0) / c.smoke.iters
    n_tokens = int(np.asarray(mask).sum())
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"forward produced a non-finite loss {float(loss)}")

    export_dir = os.path.join(c.workdir, "hf")
    save_checkpoint(export_dir, cfg, params, tokenizer=tokenizer, overwrite=True)
    cfg2, params2, _ = load_checkpoint(export_dir, sharder, **model_overrides(c))
    _, logp2 = nll(params2, tokens, mask, cfg2)
    valid = np.asarray(mask, bool)
    diff = float(np.abs(np.asarray(logp2) - np.asarray(logp))[valid].max())

    summary = {
        "next_token_nll": float(loss),
        "compile_s": compile_s,
        "tokens_per_s": n_tokens / per_iter,
        "export_dir": export_dir,
        "reload_max_abs_diff": diff,
    }
    width = max(map(len, summary))
    for k, v in summary.items():
        print(f"  {k:<{width}}  {v:.6g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    if diff > 0:
        raise RuntimeError(
            f"exported checkpoint at {export_dir} reloads with different log-probs (max diff {diff})"
        )
    return summary
