"""The training loop (on-policy mode): data -> rollout (sampler, verifier, algorithm) -> update ->
adaptive batch size -> metrics -> Orbax checkpoint, resuming from the latest checkpoint automatically.

Everything a step depends on is either in the checkpoint (train state, data position, the FCI filter's
running mean, the adaptive batch size) or derived from (seed, step) (the sampling keys), so a resumed run
repeats the uninterrupted one exactly. SIGTERM (TPU preemption) makes the loop save and return.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from attnrl_jax.algo import (
    AlgoConfig,
    BatchSizeSettings,
    BatchSizeState,
    RunningMean,
    update_batch_size,
)
from attnrl_jax.checkpoint import Checkpointer, PreemptionGuard
from attnrl_jax.data import IteratorState, PromptIterator, read_verl_parquet
from attnrl_jax.mesh import MeshConfig, Sharder, make_mesh
from attnrl_jax.metrics import LaggedMetrics, MetricWriter
from attnrl_jax.model import ModelConfig, init_sharded_params, token_log_probs
from attnrl_jax.model.hf_io import load_checkpoint
from attnrl_jax.rewards import VerifierPool
from attnrl_jax.rl import LossConfig, OptimConfig, init_sharded_train_state, jit_train_step, make_optimizer
from attnrl_jax.rollout import rollout
from attnrl_jax.sampling import LoopSettings, Sampler, SamplingParams
from attnrl_jax.smoke import MODEL_OVERRIDES, model_config


@dataclasses.dataclass(frozen=True)
class Settings:
    model: ModelConfig
    algo: AlgoConfig
    loop: LoopSettings
    loss: LossConfig
    optim: OptimConfig
    mesh: MeshConfig


def settings_from_config(c: ConfigDict) -> Settings:
    """Typed settings from the ConfigDict; raises ValueError/FileNotFoundError naming the key."""
    for key, path in (("model.hf_path", c.model.hf_path), ("data.train_path", c.data.train_path)):
        if key == "model.hf_path" and not path:
            continue
        if not path or not os.path.exists(path):
            raise FileNotFoundError(f"config.{key}={path!r}: no such file or directory")
    model = model_config(c)
    algo = AlgoConfig.preset(c.algo.preset)
    algo = algo.replace(
        group_size=c.algo.group_size,
        continuations=c.algo.continuations,
        atb=dataclasses.replace(algo.atb, token_distance=c.algo.token_distance),
        batch_size=BatchSizeSettings(
            initial=c.algo.initial_batch,
            target_paths=c.algo.target_paths,
            rule=algo.batch_size.rule,
            max_size=max(1024, c.algo.initial_batch),
        ),
    )
    loop = LoopSettings(
        max_new_tokens=c.sampler.max_new_tokens,
        sampling=SamplingParams(c.sampler.temperature, c.sampler.top_k, c.sampler.top_p),
        num_steps=c.algo.fci_buckets,
    )
    loss = LossConfig(
        c.loss.clip_low,
        c.loss.clip_high,
        c.loss.dual_clip,
        c.loss.kl_coef,
        c.loss.entropy_coef,
        c.loss.aggregation,
    )
    optim = OptimConfig(
        lr=c.optim.lr,
        weight_decay=c.optim.weight_decay,
        grad_clip=c.optim.grad_clip,
        warmup_steps=c.optim.warmup_steps,
        schedule=c.optim.schedule,
        total_steps=max(c.train.steps, 1),
    )
    mesh = MeshConfig(**c.mesh)
    mesh.resolve(jax.device_count())
    for key in ("steps", "micro_batches", "row_length"):
        if c.train[key] < 1:
            raise ValueError(f"config.train.{key} must be at least 1, got {c.train[key]}")
    if c.train.row_length <= c.data.max_prompt_len:
        raise ValueError(
            f"config.train.row_length={c.train.row_length} leaves no room after "
            f"config.data.max_prompt_len={c.data.max_prompt_len}"
        )
    return Settings(model, algo, loop, loss, optim, mesh)


def run(c: ConfigDict) -> dict:
    """Trains for config.train.steps steps (resuming from config.workdir); returns the last metrics."""
    s = settings_from_config(c)
    sharder = Sharder(make_mesh(s.mesh))
    tokenizer_path = c.tokenizer_path or c.model.hf_path
    if not tokenizer_path:
        raise ValueError(
            "config.tokenizer_path is empty and there is no config.model.hf_path to take it from"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if c.model.hf_path:
        cfg, params, _ = load_checkpoint(c.model.hf_path, sharder, **{k: c.model[k] for k in MODEL_OVERRIDES})
    else:
        cfg, params = s.model, init_sharded_params(s.model, jax.random.key(c.seed), sharder)
    # The frozen reference is the initial policy; copied, since the train state's buffers are donated.
    ref_params = jax.tree.map(jnp.copy, params) if s.loss.kl_coef > 0 else None

    problems = read_verl_parquet(c.data.train_path)
    encode = lambda p: len(
        tokenizer.apply_chat_template(list(p.messages), add_generation_prompt=True, tokenize=True)[
            "input_ids"
        ]
    )  # noqa: E731
    iterator = PromptIterator(problems, c.data.shuffle_seed, encode, c.data.max_prompt_len)
    optimizer = make_optimizer(s.optim)
    state = init_sharded_train_state(params, optimizer, sharder, cfg)
    running, bsz = RunningMean(), BatchSizeState(s.algo.batch_size.initial, 0)

    ckpt = Checkpointer(os.path.join(c.workdir, "ckpt"), c.ckpt.max_to_keep)
    start = 0
    if ckpt.latest_step() is not None:
        state, meta, start = ckpt.restore(state)
        iterator.restore(IteratorState.from_dict(meta["data"]))
        running = RunningMean(**meta["running_fci"])
        bsz = BatchSizeState(*meta["batch_size"])
        print(f"resumed from step {start} in {ckpt.directory}")

    step_fn = jit_train_step(cfg, s.loss, optimizer, state, c.train.micro_batches, sharder)
    writer = MetricWriter(c.workdir)
    lagged = LaggedMetrics()
    last: dict = {}

    def save(step):
        meta = {
            "data": iterator.state.to_dict(),
            "running_fci": running._asdict(),
            "batch_size": list(bsz),
            "config": c.to_dict(),
        }
        ckpt.save(step, state, meta)

    with VerifierPool(c.reward.workers or None, c.reward.timeout) as pool, PreemptionGuard() as guard:
        sampler = Sampler(state.params, cfg, tokenizer, s.loop, sharder=sharder)

        def score(texts, gts):
            return [v.acc for v in pool.score(texts, gts)]

        for step in tqdm(
            range(start, c.train.steps), initial=start, total=c.train.steps, desc="train", unit="step"
        ):
            t0 = time.perf_counter()
            sampler.params = state.params
            batch_problems = iterator.take(bsz.size)
            result = rollout(
                sampler,
                score,
                batch_problems,
                s.algo,
                running,
                seed=c.seed * 1_000_003 + step,
                row_length=c.train.row_length,
                rows_multiple=c.train.micro_batches,
            )
            running = result.running_fci
            t1 = time.perf_counter()
            metrics = dict(result.metrics)
            if result.batch is not None:
                batch = result.batch
                if ref_params is not None:
                    ref = token_log_probs(
                        ref_params,
                        batch.tokens,
                        batch.targets,
                        cfg=cfg,
                        segment_ids=batch.segment_ids,
                        sharder=sharder,
                    )
                    batch = dataclasses.replace(batch, ref_logp=ref)
                state, device_metrics = step_fn(state, batch)
                done = lagged.push(step + 1, device_metrics)
                if done is not None:
                    _check_finite(done[1], done[0], save, step + 1)
                    metrics.update({f"update/{k}": float(v) for k, v in done[1].items()})
            if c.algo.adaptive_batch:
                bsz = update_batch_size(bsz, result.num_paths, s.algo.batch_size)
            metrics.update(
                time_rollout=t1 - t0, time_update=time.perf_counter() - t1, prompt_batch=len(batch_problems)
            )
            writer.write(step + 1, metrics)
            last = metrics
            if (step + 1) % c.ckpt.every == 0 or step + 1 == c.train.steps or guard.requested:
                done = lagged.flush()
                if done is not None:
                    _check_finite(done[1], done[0], save, step + 1)
                save(step + 1)
            if guard.requested:
                print(f"SIGTERM: saved step {step + 1} and stopping")
                break
    writer.close()
    ckpt.close()
    return last


def _check_finite(metrics, step, ckpt, save):
    if float(np.asarray(metrics["finite"])) == 0.0:
        raise FloatingPointError(
            f"step {step}: non-finite loss or gradient; the last good state is in {ckpt.directory}"
        )
