"""The one translation of a run's ConfigDict into typed settings: the model (a preset or a checkpoint's
config.json, plus the run fields `MODEL_OVERRIDES`), the method (`algo_config`), the sampler's loop
(`loop_settings`), the loss, the optimizer and the mesh, checked before any heavy work
(`settings_from_config` raises ValueError/FileNotFoundError naming the key). The jobs (trainer, smoke,
evaluation, the built-in task) and the tools (fit, report, benchmarks) read settings from here.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from ml_collections import ConfigDict

from attnrl_jax.algo import AlgoConfig, BatchSizeSettings
from attnrl_jax.memory import check_memory_settings
from attnrl_jax.mesh import MeshConfig
from attnrl_jax.model import ModelConfig
from attnrl_jax.rl import LossConfig, OptimConfig
from attnrl_jax.sampling import LoopSettings, SamplingParams
from attnrl_jax.sampling.loop import check_page_size

# The ModelConfig fields a run sets beyond a checkpoint's config.json (how to run the model, not what it
# is): the one list of them (a config, a stored run's config, the evaluation job's).
MODEL_OVERRIDES = ("param_dtype", "dtype", "remat", "attention_impl", "logits_chunk", "mlp_chunk")


def model_overrides(c: ConfigDict) -> dict:
    """The config.model fields that a ModelConfig takes beyond config.json (those a config sets)."""
    return {k: c.model[k] for k in MODEL_OVERRIDES if k in c.model}


def model_config(c: ConfigDict) -> ModelConfig:
    """The ModelConfig named by config.model (a preset, or the config.json of hf_path)."""
    overrides = model_overrides(c)
    if c.model.hf_path:
        return ModelConfig.from_hf_dir(c.model.hf_path, **overrides)
    return ModelConfig.preset(c.model.preset, **overrides)


@dataclasses.dataclass(frozen=True)
class Settings:
    model: ModelConfig
    algo: AlgoConfig
    loop: LoopSettings
    loss: LossConfig
    optim: OptimConfig
    mesh: MeshConfig


def loop_settings(c: ConfigDict) -> LoopSettings:
    """The sampler's loop settings of a config: length limit, sampling, FCI buckets and Delta."""
    return LoopSettings(
        max_new_tokens=c.sampler.max_new_tokens,
        sampling=SamplingParams(c.sampler.temperature, c.sampler.top_k, c.sampler.top_p),
        num_steps=c.algo.fci_buckets,
        delta=c.algo.fci_delta,
        page_size=c.sampler.page_size,
    )


def eval_loop_settings(c: ConfigDict) -> LoopSettings:
    """The sampler's loop settings of an eval config (no FCI: two step buckets)."""
    return LoopSettings(
        max_new_tokens=c.eval.max_new_tokens,
        sampling=SamplingParams(c.eval.temperature, c.eval.top_k, c.eval.top_p),
        num_steps=2,  # FCI is not needed here
        page_size=c.eval.page_size,
    )


def heldout_loop_settings(c: ConfigDict) -> LoopSettings:
    """The sampler's loop settings of the trainer's held-out evaluations (config.heldout; no FCI)."""
    return LoopSettings(
        max_new_tokens=c.heldout.max_new_tokens or c.sampler.max_new_tokens,
        sampling=SamplingParams(c.heldout.temperature, 0, 1.0),
        num_steps=2,  # FCI is not needed here
        page_size=c.sampler.page_size,
    )


def algo_config(c: ConfigDict) -> AlgoConfig:
    """The method named by config.algo.preset with the config's algo fields applied. A preset's own ATB
    token distance (the `paper` preset's 0) stands unless config.algo.token_distance is set explicitly."""
    algo = AlgoConfig.preset(c.algo.preset)
    atb = algo.atb
    if c.algo.token_distance is not None:
        atb = dataclasses.replace(atb, token_distance=c.algo.token_distance)
    return algo.replace(
        group_size=c.algo.group_size,
        continuations=c.algo.continuations,
        fci_delta=c.algo.fci_delta,
        atb=atb,
        batch_size=BatchSizeSettings(
            initial=c.algo.initial_batch,
            target_paths=c.algo.target_paths,
            rule=algo.batch_size.rule,
            max_size=max(c.algo.max_batch, c.algo.initial_batch),
        ),
    )


def settings_from_config(c: ConfigDict, num_devices: int | None = None, check_paths: bool = True) -> Settings:
    """Typed settings from the ConfigDict for a mesh of `num_devices` (default: all devices); raises
    ValueError/FileNotFoundError naming the key. `check_paths=False` skips the checkpoint and data files
    (a compile-only measurement of the shipped config, `benchmarks/scale_memory.py`)."""
    for key, path in (("model.hf_path", c.model.hf_path), ("data.train_path", c.data.train_path)):
        if not check_paths or (key == "model.hf_path" and not path):
            continue
        if not path or not os.path.exists(path):
            raise FileNotFoundError(f"config.{key}={path!r}: no such file or directory")
    model = model_config(c)
    algo = algo_config(c)
    loop = loop_settings(c)
    loss = LossConfig(
        c.loss.clip_low,
        c.loss.clip_high,
        c.loss.dual_clip,
        c.loss.kl_coef,
        c.loss.entropy_coef,
        c.loss.aggregation,
        temperature=c.sampler.temperature,
        objective=c.loss.get("objective", "ppo_clip"),
    )
    optim = OptimConfig(
        lr=c.optim.lr,
        weight_decay=c.optim.weight_decay,
        grad_clip=c.optim.grad_clip,
        warmup_steps=c.optim.warmup_steps,
        schedule=c.optim.schedule,
        # The schedule counts optimizer steps: about target_paths / mini_batch_rows per training step.
        total_steps=max(c.train.steps, 1)
        * max(1, -(-c.algo.target_paths // (c.train.mini_batch_rows or c.algo.target_paths))),
    )
    mesh = MeshConfig(**c.mesh)
    mesh.resolve(jax.device_count() if num_devices is None else num_devices)
    if "micro_batches" in c.train:
        raise ValueError(
            "config.train.micro_batches is no longer a setting: set config.train.rows_per_device (rows per "
            "device per micro-batch; the micro-batch count follows from the mesh)"
        )
    check_memory_settings(c.sampler, "sampler")
    check_page_size("config.sampler.page_size", c.sampler.page_size)
    for key in ("steps", "row_length"):
        if c.train[key] < 1:
            raise ValueError(f"config.train.{key} must be at least 1, got {c.train[key]}")
    for key in ("mini_batch_rows", "rows_per_device"):
        if c.train[key] < 0:
            raise ValueError(f"config.train.{key} must be 0 or positive, got {c.train[key]}")
    for key in ("every", "max_to_keep"):
        if c.ckpt[key] < 1:
            raise ValueError(f"config.ckpt.{key} must be at least 1, got {c.ckpt[key]}")
    if c.algo.group_size < 2 or c.algo.initial_batch < 1:
        raise ValueError(
            f"config.algo.group_size must be >= 2 and initial_batch >= 1, got {c.algo.group_size}, "
            f"{c.algo.initial_batch}"
        )
    if "heldout" in c and c.heldout.every:
        if c.heldout.every < 0 or c.heldout.k < 1 or c.heldout.max_new_tokens < 0:
            raise ValueError(
                "config.heldout: every must be 0 or positive, k at least 1, max_new_tokens 0 or positive; "
                "got "
                f"{c.heldout.every}, {c.heldout.k}, {c.heldout.max_new_tokens}"
            )
        if check_paths and not c.heldout.data:
            raise ValueError(
                f"config.heldout.every={c.heldout.every} needs config.heldout.data (eval parquet files)"
            )
    if c.train.row_length <= c.data.max_prompt_len:
        raise ValueError(
            f"config.train.row_length={c.train.row_length} leaves no room after "
            f"config.data.max_prompt_len={c.data.max_prompt_len}"
        )
    return Settings(model, algo, loop, loss, optim, mesh)
