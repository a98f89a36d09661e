"""The training loop: data -> rollout (sampler with FCI, verifier, algorithm) -> update -> adaptive batch
size -> metrics -> Orbax checkpoint, resuming from the latest checkpoint automatically.

Two pipelines (`config.train.off_policy`):
  * one-step off-policy (ALGORITHM.md section 10, AttnRL's default): ONE sampler call per step samples the
    next prompt batch's initial responses and the current batch's continuations; the current batch's
    initial responses come from the policy one update older. The first step samples its own initial
    responses first (it is on-policy, as in the paper).
  * on-policy (`rollout`): initial responses, then continuations, two sampler calls per step (TreeRL).

Everything a step depends on is in the checkpoint (train state, data position, the FCI filter's running
mean, the adaptive batch size, the off-policy in-flight batch with its rewards) or derived from
(seed, step) (the sampling keys), so a resumed run repeats the uninterrupted one exactly. SIGTERM (TPU
preemption) makes the loop save and return; a step whose loss or gradient is not finite is skipped by the
train step, and the loop then saves the (finite) state and stops with an error naming the step.
"""

from __future__ import annotations

import dataclasses
import functools
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
from attnrl_jax.distributed import ShardedScorer, any_process, fetch, is_main
from attnrl_jax.mesh import MeshConfig, Sharder, make_mesh
from attnrl_jax.metrics import LaggedMetrics, MetricWriter
from attnrl_jax.model import ModelConfig, init_sharded_params
from attnrl_jax.model.hf_io import load_checkpoint, save_checkpoint
from attnrl_jax.rewards import VerifierPool
from attnrl_jax.rl import (
    LossConfig,
    OptimConfig,
    init_sharded_train_state,
    jit_train_step,
    make_optimizer,
    recompute_log_probs,
)
from attnrl_jax.rollout import InitialBatch, offpolicy_step, rollout, sample_initial
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


def settings_from_config(c: ConfigDict) -> Settings:
    """Typed settings from the ConfigDict; raises ValueError/FileNotFoundError naming the key."""
    for key, path in (("model.hf_path", c.model.hf_path), ("data.train_path", c.data.train_path)):
        if key == "model.hf_path" and not path:
            continue
        if not path or not os.path.exists(path):
            raise FileNotFoundError(f"config.{key}={path!r}: no such file or directory")
    model = model_config(c)
    algo = algo_config(c)
    loop = LoopSettings(
        max_new_tokens=c.sampler.max_new_tokens,
        sampling=SamplingParams(c.sampler.temperature, c.sampler.top_k, c.sampler.top_p),
        num_steps=c.algo.fci_buckets,
        delta=c.algo.fci_delta,
    )
    loss = LossConfig(
        c.loss.clip_low,
        c.loss.clip_high,
        c.loss.dual_clip,
        c.loss.kl_coef,
        c.loss.entropy_coef,
        c.loss.aggregation,
        temperature=c.sampler.temperature,
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
    mesh.resolve(jax.device_count())
    for key in ("steps", "micro_batches", "row_length"):
        if c.train[key] < 1:
            raise ValueError(f"config.train.{key} must be at least 1, got {c.train[key]}")
    if c.train.mini_batch_rows < 0 or c.train.mini_batch_rows % c.train.micro_batches:
        raise ValueError(
            f"config.train.mini_batch_rows={c.train.mini_batch_rows} must be 0 or a positive multiple of "
            f"config.train.micro_batches={c.train.micro_batches}"
        )
    for key in ("every", "max_to_keep"):
        if c.ckpt[key] < 1:
            raise ValueError(f"config.ckpt.{key} must be at least 1, got {c.ckpt[key]}")
    if c.algo.group_size < 2 or c.algo.initial_batch < 1:
        raise ValueError(
            f"config.algo.group_size must be >= 2 and initial_batch >= 1, got {c.algo.group_size}, "
            f"{c.algo.initial_batch}"
        )
    if c.train.row_length <= c.data.max_prompt_len:
        raise ValueError(
            f"config.train.row_length={c.train.row_length} leaves no room after "
            f"config.data.max_prompt_len={c.data.max_prompt_len}"
        )
    return Settings(model, algo, loop, loss, optim, mesh)


class _Clock:
    """Seconds spent waiting on the verifier (futures resolved through `wrap`)."""

    def __init__(self):
        self.waited = 0.0

    def wrap(self, future):
        clock = self

        class _Timed:
            def result(self):
                t = time.perf_counter()
                out = future.result()
                clock.waited += time.perf_counter() - t
                return out

        return _Timed()


def _update(step_fn, state, batch, rows: int, place):
    """One optimizer step per `rows`-row mini-batch of the host `batch`, in order (section 11: ppo_epochs 1),
    each placed on the mesh by `place`. Returns the new state and the list of each mini-batch's metrics,
    still on the device (see `_reduce`)."""
    n = batch.tokens.shape[0]
    rows = rows or n
    outs = []
    for lo in range(0, n, rows):
        state, m = step_fn(state, place(jax.tree.map(lambda x, lo=lo: x[lo : lo + rows], batch)))
        outs.append(m)
    return state, outs


def _reduce(per_minibatch: list[dict]) -> dict[str, float]:
    """Host-side mean of fetched mini-batch metrics (`finite`: the minimum), plus the optimizer step count."""
    out = {k: float(np.mean([float(m[k]) for m in per_minibatch])) for k in per_minibatch[0]}
    out["finite"] = float(min(float(m["finite"]) for m in per_minibatch))
    out["optimizer_steps"] = float(len(per_minibatch))
    return out


def _tokens(batch: InitialBatch | None) -> int:
    return 0 if batch is None else sum(len(s.tokens) for group in batch.samples for s in group)


def _say(message: str) -> None:
    if is_main():
        print(message, flush=True)


def _exists_on_main(path: str) -> bool:
    """Whether `path` exists, as process 0 sees it (one answer for all processes, so they take the same
    branch around collectives)."""
    exists = os.path.exists(path)
    if jax.process_count() == 1:
        return exists
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))


def latest_export(workdir: str) -> str | None:
    """The newest `export/step_N` Hugging Face directory of a training run, if any."""
    root = os.path.join(workdir, "export")
    steps = [int(d[5:]) for d in os.listdir(root) if d.startswith("step_")] if os.path.isdir(root) else []
    return os.path.join(root, f"step_{max(steps)}") if steps else None


def run(c: ConfigDict) -> dict:
    """Trains for config.train.steps steps (resuming from config.workdir); returns the last step's metrics."""
    s = settings_from_config(c)
    tokenizer_path = c.tokenizer_path or c.model.hf_path
    if not tokenizer_path:
        raise ValueError(
            "config.tokenizer_path is empty and there is no config.model.hf_path to take it from"
        )
    if not os.path.isdir(tokenizer_path):
        raise FileNotFoundError(f"config.tokenizer_path={tokenizer_path!r}: no such directory")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    sharder = Sharder(make_mesh(s.mesh))  # every process's devices: one global mesh
    _say(
        f"mesh {dict(sharder.mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s) "
        f"in {jax.process_count()} process(es)"
    )

    def place(batch):
        """A host TrainBatch (the same on every process) on the mesh, rows split over the batch axes."""
        return jax.tree.map(lambda x: sharder.put(x, ("batch",) + (None,) * (x.ndim - 1)), batch)

    if c.model.hf_path:
        cfg, params, _ = load_checkpoint(c.model.hf_path, sharder, **{k: c.model[k] for k in MODEL_OVERRIDES})
    else:
        cfg, params = s.model, init_sharded_params(s.model, jax.random.key(c.seed), sharder)
    # The frozen reference is the initial policy; copied, since the train state's buffers are donated.
    ref_params = jax.tree.map(jnp.copy, params) if s.loss.kl_coef > 0 else None

    problems = read_verl_parquet(c.data.train_path)

    def prompt_len(p):
        out = tokenizer.apply_chat_template(list(p.messages), add_generation_prompt=True, tokenize=True)
        return len(out["input_ids"] if hasattr(out, "keys") else out)

    iterator = PromptIterator(problems, c.data.shuffle_seed, prompt_len, c.data.max_prompt_len)
    optimizer = make_optimizer(s.optim)
    state = init_sharded_train_state(params, optimizer, sharder, cfg)
    running, bsz = RunningMean(), BatchSizeState(s.algo.batch_size.initial, 0)
    totals = {"generated_tokens": 0, "elapsed_s": 0.0}  # cumulative over the run, resumes included
    inflight: InitialBatch | None = None
    decode = functools.partial(tokenizer.decode, skip_special_tokens=True)

    ckpt = Checkpointer(os.path.join(c.workdir, "ckpt"), c.ckpt.max_to_keep)
    start = 0
    if ckpt.latest_step() is not None:
        state, meta, arrays, start = ckpt.restore_all(state)
        iterator.restore(IteratorState.from_dict(meta["data"]))
        running = RunningMean(**meta["running_fci"])
        bsz = BatchSizeState(*meta["batch_size"])
        totals.update(meta.get("totals", {}))
        if arrays is not None:
            inflight = InitialBatch.from_arrays(arrays, meta["inflight_problems"], decode)
        _say(f"resumed from step {start} in {ckpt.directory}")

    step_fn = jit_train_step(cfg, s.loss, optimizer, state, c.train.micro_batches, sharder)

    @jax.jit
    def recompute(params, batch):
        """Old log-probs from a forward pass and their mean |difference| to the sampler's (loss tokens)."""
        logp = recompute_log_probs(
            params, batch, model_cfg=cfg, temperature=s.loss.temperature, sharder=sharder
        )
        mask = batch.loss_mask.astype(jnp.float32)
        mismatch = jnp.sum(jnp.abs(logp - batch.old_logp) * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        return logp, mismatch

    ref_fn = jax.jit(functools.partial(recompute_log_probs, model_cfg=cfg, temperature=1.0, sharder=sharder))
    writer = MetricWriter(c.workdir, resume_step=start)
    lagged = LaggedMetrics()
    held: dict[int, dict] = {}  # host metrics of steps whose device metrics are not fetched yet
    last: dict = {}
    if iterator.dropped and start == 0:
        _say(f"dropped {iterator.dropped} prompts longer than {c.data.max_prompt_len} tokens")

    def save(step):
        meta = {
            "data": iterator.state.to_dict(),
            "running_fci": running._asdict(),
            "batch_size": list(bsz),
            "totals": dict(totals),
            "config": c.to_dict(),
            "inflight_problems": None,
        }
        arrays = None
        if inflight is not None:
            arrays, meta["inflight_problems"] = inflight.to_arrays()
        ckpt.save(step, state, meta, arrays)

    def emit(done):
        """Writes a step's record once its device metrics arrive; stops on a non-finite update."""
        nonlocal last
        if done is None:
            return
        step, fetched = done
        record = held.pop(step)
        device = _reduce(fetched["minibatches"]) if fetched.get("minibatches") else {}
        if "logp_mismatch" in fetched:
            device["logp_mismatch"] = float(fetched["logp_mismatch"])
        record.update({f"update/{k}": v for k, v in device.items()})
        writer.write(step, record)
        last = record
        if device and device["finite"] == 0.0:
            save(current_step)
            raise FloatingPointError(
                f"step {step}: non-finite loss or gradient; the update was skipped and the last good state "
                f"is saved in {ckpt.directory} (step {current_step})"
            )

    current_step = start
    clock = _Clock()
    rows = {
        "row_length": c.train.row_length,
        "rows_multiple": c.train.mini_batch_rows or c.train.micro_batches,
    }
    finished = start >= c.train.steps
    mode = "off-policy" if c.train.off_policy else "on-policy"
    with VerifierPool(c.reward.workers or None, c.reward.timeout) as pool, PreemptionGuard() as guard:
        sampler = Sampler(state.params, cfg, tokenizer, s.loop, sharder=sharder)
        # Each process grades its share of the responses; every process gets all verdicts.
        scorer = ShardedScorer(pool.submit)
        score = lambda texts, gts: clock.wrap(scorer(texts, gts))  # noqa: E731
        bar = tqdm(
            range(start, c.train.steps),
            initial=start,
            total=c.train.steps,
            desc=f"train ({c.algo.preset}, {mode})",
            unit="step",
            disable=not is_main(),
        )
        for step in bar:
            t0 = time.perf_counter()
            clock.waited = 0.0
            sampler.params = state.params
            seed = c.seed * 1_000_003 + 4 * step
            generated = 0
            if c.train.off_policy:
                if inflight is None:  # the first step samples its own initial responses (on-policy)
                    inflight = sample_initial(
                        sampler, iterator.take(bsz.size), s.algo.group_size, score, seed=seed + 2
                    )
                    generated += _tokens(inflight)
                result, inflight = offpolicy_step(
                    sampler, score, inflight, iterator.take(bsz.size), s.algo, running, seed=seed, **rows
                )
                generated += _tokens(inflight)
            else:
                result = rollout(sampler, score, iterator.take(bsz.size), s.algo, running, seed=seed, **rows)
                generated += int(result.metrics["initial_tokens"])
            generated += int(result.metrics.get("continuation_tokens", 0))
            running = result.running_fci
            t1 = time.perf_counter()
            metrics = dict(result.metrics)
            device_metrics = {}
            if result.batch is not None:
                batch = result.batch
                if c.train.recompute_logprobs:
                    recomputed, mismatch = recompute(state.params, place(batch))
                    batch = dataclasses.replace(batch, old_logp=fetch(recomputed))
                if ref_params is not None:
                    batch = dataclasses.replace(batch, ref_logp=fetch(ref_fn(ref_params, place(batch))))
                state, minibatches = _update(step_fn, state, batch, c.train.mini_batch_rows, place)
                device_metrics = {"minibatches": minibatches}
                if c.train.recompute_logprobs:
                    device_metrics["logp_mismatch"] = mismatch
            current_step = step + 1
            if c.algo.adaptive_batch:
                bsz = update_batch_size(bsz, result.num_paths, s.algo.batch_size)
            t2 = time.perf_counter()
            metrics.update(
                time_sample=t1 - t0 - clock.waited,
                time_score=clock.waited,
                time_update=t2 - t1,
                time_step=t2 - t0,
                total_generated_tokens=totals["generated_tokens"] + generated,
                total_time_s=totals["elapsed_s"] + (t2 - t0),
                generated_tokens=generated,
                tokens_per_s=generated / max(t1 - t0 - clock.waited, 1e-9),
                next_prompt_batch=bsz.size,
            )
            held[step + 1] = metrics
            emit(lagged.push(step + 1, device_metrics))
            bar.set_postfix(
                acc=f"{metrics['accuracy']:.3f}",
                paths=result.num_paths,
                timeouts=metrics["verifier_timeouts"],
                errors=metrics["verifier_errors"],
                overflow=metrics["step_overflow"],
                fallback=metrics["needs_fallback"],
            )
            totals["generated_tokens"] += generated
            totals["elapsed_s"] += t2 - t0
            budget_spent = 0 < c.train.max_generated_tokens <= totals["generated_tokens"]
            if budget_spent:
                _say(f"sampling budget spent ({totals['generated_tokens']} tokens): stopping")
            last_step = step + 1 == c.train.steps or budget_spent
            finished = finished or last_step
            stop_requested = any_process(guard.requested)  # a preemption notice to any host stops all
            if (step + 1) % c.ckpt.every == 0 or last_step or stop_requested:
                emit(lagged.flush())
                save(step + 1)
            if budget_spent:
                break
            if stop_requested:
                _say(f"SIGTERM: saved step {step + 1} and stopping")
                break
        bar.close()
        emit(lagged.flush())
    if c.ckpt.export and finished:
        path = os.path.join(c.workdir, "export", f"step_{current_step}")
        if not _exists_on_main(path):  # every process gathers the params; process 0 writes
            save_checkpoint(path, cfg, state.params, tokenizer=tokenizer)
            _say(f"exported the policy to {path}")
    writer.close()
    ckpt.close()
    return last
