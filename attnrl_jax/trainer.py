"""The training loop: data -> rollout (sampler with FCI, verifier, algorithm) -> update -> adaptive batch
size -> metrics -> Orbax checkpoint, resuming from the latest checkpoint automatically.

Two pipelines (`config.train.off_policy`):
  * one-step off-policy (docs/algorithm.md section 10, AttnRL's default): ONE sampler call per step samples
    the next prompt batch's initial responses and the current batch's continuations; the current batch's
    initial responses come from the policy one update older. The first step samples its own initial
    responses first (it is on-policy, as in the paper).
  * on-policy (`rollout`): initial responses, then continuations, two sampler calls per step (TreeRL).

One training step is a sequence of named stages, each a function below:

  sample     the rollout: sampler calls (with FCI), the verifier's rewards, trees and paths, training rows
             (`rollout.py`), as a host TrainBatch;
  rows       the rows cut into fixed-shape PPO mini-batches (empty rows pad the last one and make every
             micro-batch divide the mesh), placed on the mesh;
  reference  the frozen reference's log-probs (k3 KL) and, with `recompute_logprobs`, the behaviour
             log-probs recomputed by the policy before any update, one jitted pass per mini-batch, on device;
  update     one optimizer step per mini-batch;
  checkpoint Orbax, every `ckpt.every` steps, on the last step and on SIGTERM or Ctrl-C;
  log        the step's record, written once its device metrics arrive (one step later, so that fetching
             them never stalls the device).

Everything a step depends on is in the checkpoint (train state, data position, the FCI filter's running
mean, the adaptive batch size, the off-policy in-flight batch with its rewards) or derived from
(seed, step) (the sampling keys), so a resumed run repeats the uninterrupted one exactly, and a resume
under other settings than the checkpoint's stops naming them (`run_record.py`). SIGTERM or Ctrl-C (TPU
preemption) makes the loop save and return; a step whose loss or gradient is not finite is skipped by the
train step, and the loop then saves the (finite) state and stops with an error naming the step.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict
from tqdm import tqdm

from attnrl_jax import eval_job, run_record
from attnrl_jax.algo import (
    BatchSizeState,
    RunningMean,
    update_batch_size,
)
from attnrl_jax.checkpoint import Checkpointer, PreemptionGuard, inflight_from_arrays, inflight_to_arrays
from attnrl_jax.data import IteratorState, PromptIterator, read_verl_parquet
from attnrl_jax.distributed import ShardedScorer, any_process, is_main
from attnrl_jax.memory import (
    cache_gib,
    device_capacity,
    resident_bytes,
    to_device,
    to_host,
)
from attnrl_jax.mesh import Sharder, make_mesh
from attnrl_jax.metrics import LaggedMetrics, MetricWriter
from attnrl_jax.model import ModelConfig, init_sharded_params
from attnrl_jax.model.hf_io import load_checkpoint, load_tokenizer, save_checkpoint
from attnrl_jax.model.params import compute_params
from attnrl_jax.rewards import VerifierPool
from attnrl_jax.rl import (
    LossConfig,
    Microbatching,
    TrainBatch,
    TrainState,
    batch_log_probs,
    init_sharded_train_state,
    jit_train_step,
    make_optimizer,
    plan_microbatches,
)
from attnrl_jax.rollout import InitialBatch, RolloutResult, offpolicy_step, rollout, sample_initial
from attnrl_jax.sampling import Sampler
from attnrl_jax.settings import Settings, heldout_loop_settings, model_overrides, settings_from_config


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

    return bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))


def finished_export(workdir: str) -> str | None:
    """The Hugging Face export of a finished run: `export/step_N` for the newest checkpoint step N, or None
    while the run is unfinished (an older export of a run since extended does not count)."""
    ckpt = os.path.join(workdir, "ckpt")
    steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
    path = os.path.join(workdir, "export", f"step_{max(steps)}") if steps else None
    return path if path and os.path.isfile(os.path.join(path, "config.json")) else None


def latest_export(workdir: str) -> str | None:
    """The newest `export/step_N` Hugging Face directory of a training run, if any."""
    root = os.path.join(workdir, "export")
    steps = [int(d[5:]) for d in os.listdir(root) if d.startswith("step_")] if os.path.isdir(root) else []
    return os.path.join(root, f"step_{max(steps)}") if steps else None


# ------------------------------------------------------------------------------------------------------
# What a run holds


@dataclasses.dataclass
class Progress:
    """Everything besides the train state that a step changes and a checkpoint keeps: the data position
    (in the iterator), the FCI filter's running mean, the adaptive batch size, the run's totals and the
    off-policy in-flight batch."""

    iterator: PromptIterator
    running: RunningMean
    bsz: BatchSizeState
    totals: dict
    inflight: InitialBatch | None = None

    def meta(self, c: ConfigDict) -> tuple[dict, dict | None]:
        meta = {
            "data": self.iterator.state.to_dict(),
            "running_fci": self.running._asdict(),
            "batch_size": list(self.bsz),
            "totals": dict(self.totals),
            "config": c.to_dict(),
            "inflight_problems": None,
        }
        arrays = None
        if self.inflight is not None:
            arrays, meta["inflight_problems"] = inflight_to_arrays(self.inflight)
        return meta, arrays

    def restore(self, meta: dict, arrays, decode) -> None:
        self.iterator.restore(IteratorState.from_dict(meta["data"]))
        self.running = RunningMean(**meta["running_fci"])
        self.bsz = BatchSizeState(*meta["batch_size"])
        self.totals.update(meta.get("totals", {}))
        if arrays is not None:
            self.inflight = inflight_from_arrays(arrays, meta["inflight_problems"], decode)


@dataclasses.dataclass
class Job:
    """The fixed parts of a run: config, settings, mesh, model, reference, optimizer and the compiled
    functions of the update (one per mini-batch shape: one for a run with fixed mini-batches)."""

    c: ConfigDict
    s: Settings
    sharder: Sharder
    cfg: ModelConfig
    optimizer: object
    ref_params: object | None
    _compiled: dict = dataclasses.field(default_factory=dict)

    def place(self, batch: TrainBatch) -> TrainBatch:
        """A host TrainBatch (the same on every process) on the mesh, rows split over the batch axes."""
        return jax.tree.map(lambda x: self.sharder.put(x, ("batch",) + (None,) * (x.ndim - 1)), batch)

    def plan(self, rows: int) -> Microbatching:
        """The micro-batching of a mini-batch of `rows` real rows on this mesh."""
        return plan_microbatches(rows, self.c.train.rows_per_device, self.sharder.batch_parallelism())

    def step_fn(self, state: TrainState, count: int) -> Callable:
        key = ("update", count)
        if key not in self._compiled:
            self._compiled[key] = jit_train_step(
                self.cfg, self.s.loss, self.optimizer, state, count, self.sharder
            )
        return self._compiled[key]

    def passes_fn(self, count: int) -> Callable:
        """The reference and recompute passes of one mini-batch, jitted (`jit_passes`)."""
        key = ("passes", count)
        if key not in self._compiled:
            self._compiled[key] = jit_passes(
                self.cfg,
                self.s.loss,
                self.sharder,
                self.ref_params is not None,
                self.c.train.recompute_logprobs,
                count,
            )
        return self._compiled[key]


def jit_passes(
    cfg: ModelConfig, loss: LossConfig, sharder: Sharder, reference: bool, recompute: bool, count: int
) -> Callable:
    """The passes before a step's first update over one mini-batch of `count` micro-batches, jitted:
    (params, ref_params, mini-batch) -> (the mini-batch with ref_logp (`reference`) and old_logp
    recomputed by the policy (`recompute`), the recompute mismatch sums). The mini-batch is donated."""
    log_probs = functools.partial(batch_log_probs, model_cfg=cfg, num_microbatches=count, sharder=sharder)

    def passes(params, ref_params, mb: TrainBatch):
        mismatch = {}
        if reference:
            mb = dataclasses.replace(mb, ref_logp=log_probs(ref_params, mb, temperature=1.0))
        if recompute:
            logp = log_probs(params, mb, temperature=loss.temperature)
            mask = mb.loss_mask.astype(jnp.float32)
            mismatch = {"sum": jnp.sum(jnp.abs(logp - mb.old_logp) * mask), "tokens": jnp.sum(mask)}
            mb = dataclasses.replace(mb, old_logp=logp)
        return mb, mismatch

    return jax.jit(passes, donate_argnums=(2,))


# ------------------------------------------------------------------------------------------------------
# The stages of a step


def sample_stage(
    job: Job, progress: Progress, sampler: Sampler, score, step: int
) -> tuple[RolloutResult, int]:
    """Rollouts for this step's prompts: sampling (with FCI), rewards, trees, paths and training rows.
    Returns the result and the number of tokens sampled."""
    c, s = job.c, job.s
    seed = c.seed * 1_000_003 + 4 * step
    generated = 0
    take = progress.iterator.take
    if c.train.off_policy:
        if progress.inflight is None:  # the first step samples its own initial responses (on-policy)
            progress.inflight = sample_initial(
                sampler, take(progress.bsz.size), s.algo.group_size, score, seed=seed + 2
            )
            generated += _tokens(progress.inflight)
        result, progress.inflight = offpolicy_step(
            sampler,
            score,
            progress.inflight,
            take(progress.bsz.size),
            s.algo,
            progress.running,
            seed=seed,
            row_length=c.train.row_length,
        )
        generated += _tokens(progress.inflight)
    else:
        result = rollout(
            sampler,
            score,
            take(progress.bsz.size),
            s.algo,
            progress.running,
            seed=seed,
            row_length=c.train.row_length,
        )
        generated += int(result.metrics["initial_tokens"])
    generated += int(result.metrics.get("continuation_tokens", 0))
    progress.running = result.running_fci
    return result, generated


def rows_stage(job: Job, batch: TrainBatch) -> tuple[list[TrainBatch], Microbatching]:
    """The host batch's real rows cut into mini-batches of `train.mini_batch_rows` (0: one of all rows),
    each padded with empty rows to the same micro-batched shape and placed on the mesh."""
    real = batch.tokens.shape[0]
    rows = job.c.train.mini_batch_rows or real
    plan = job.plan(rows)
    out = []
    for lo in range(0, real, rows):
        part = jax.tree.map(lambda x, lo=lo: np.asarray(x)[lo : min(lo + rows, real)], batch)
        pad = plan.padded_rows - part.tokens.shape[0]
        part = jax.tree.map(lambda x, pad=pad: np.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)), part)
        out.append(job.place(part))
    return out, plan


def reference_stage(
    job: Job, params, minibatches: list[TrainBatch], plan: Microbatching
) -> tuple[list[TrainBatch], dict]:
    """Reference log-probs (k3 KL) and recomputed behaviour log-probs for every mini-batch, all from the
    parameters before this step's first update, one fixed-shape jitted pass per mini-batch, on device.
    Returns the mini-batches with those fields filled and the mismatch sums (empty without recompute)."""
    if job.ref_params is None and not job.c.train.recompute_logprobs:
        return minibatches, {}
    fn = job.passes_fn(plan.count)
    out, sums = [], []
    for mb in minibatches:
        mb, mismatch = fn(params, job.ref_params, mb)
        out.append(mb)
        sums.append(mismatch)
    if not sums[0]:
        return out, {}
    total = sum(m["sum"] for m in sums) / jnp.maximum(sum(m["tokens"] for m in sums), 1.0)
    return out, {"logp_mismatch": total}


def update_stage(
    job: Job, state: TrainState, minibatches: list[TrainBatch], plan: Microbatching
) -> tuple[TrainState, list[dict]]:
    """One optimizer step per mini-batch, in order (section 11: ppo_epochs 1). Returns the new state and
    each mini-batch's metrics, still on the device."""
    step_fn = job.step_fn(state, plan.count)
    outs = []
    for mb in minibatches:
        state, m = step_fn(state, mb)
        outs.append(m)
    return state, outs


def _reduce(per_minibatch: list[dict]) -> dict[str, float]:
    """Host-side mean of fetched mini-batch metrics (`finite`: the minimum), plus the optimizer step count."""
    out = {k: float(np.mean([float(m[k]) for m in per_minibatch])) for k in per_minibatch[0]}
    out["finite"] = float(min(float(m["finite"]) for m in per_minibatch))
    out["optimizer_steps"] = float(len(per_minibatch))
    return out


@dataclasses.dataclass
class HeldOut:
    """The trainer's held-out evaluations (config.heldout): the problems, their sampler and k."""

    benchmarks: dict
    sampler: Sampler
    k: int
    every: int
    max_prompt_len: int

    def due(self, step: int, last: bool) -> bool:
        return self.every > 0 and (step % self.every == 0 or last)


def heldout_stage(held: HeldOut, params, score, step: int, seed: int) -> dict[str, float]:
    """avg@k / pass@k of the policy after `step` on the held-out problems, as `heldout/*` metrics."""
    held.sampler.params = params
    results = eval_job.evaluate_policy(
        held.sampler,
        lambda texts, gts: score(texts, gts).result(),
        held.benchmarks,
        {name: held.k for name in held.benchmarks},
        held.max_prompt_len,
        seed=seed * 1_000_003 + step,
        progress=False,
    )
    held.sampler.params = None
    out = {"heldout/avg@k": results["mean"]["avg@k"], "heldout/pass@k": results["mean"]["pass@k"]}
    for name, r in results["benchmarks"].items():
        out[f"heldout/{name}/avg@k"] = r["avg@k"]
        out[f"heldout/{name}/problems"] = float(r["problems"])
    out["heldout/k"] = float(held.k)
    return out


def checkpoint_stage(job: Job, ckpt: Checkpointer, progress: Progress, state: TrainState, step: int) -> None:
    meta, arrays = progress.meta(job.c)
    ckpt.save(step, state, meta, arrays)


def log_stage(writer: MetricWriter, held: dict[int, dict], done) -> dict | None:
    """Writes the record of a step whose device metrics arrived (`done` = (step, fetched) or None) and
    returns it; None when nothing arrived."""
    if done is None:
        return None
    step, fetched = done
    record = held.pop(step)
    device = _reduce(fetched["minibatches"]) if fetched.get("minibatches") else {}
    if "logp_mismatch" in fetched:
        device["logp_mismatch"] = float(fetched["logp_mismatch"])
    record.update({f"update/{k}": v for k, v in device.items()})
    writer.write(step, record)
    return record


# ------------------------------------------------------------------------------------------------------
# Set-up and the loop


# A run's budgets: (config.train key, the run's total it limits, its name in messages).
BUDGETS = (
    ("max_generated_tokens", "generated_tokens", "tokens sampled"),
    ("max_paths", "paths", "training paths"),
    ("max_optimizer_steps", "optimizer_steps", "optimizer steps"),
)


def budget_spent(c: ConfigDict, totals: dict) -> str | None:
    """The first of the run's budgets (config.train.max_generated_tokens, max_paths, max_optimizer_steps; 0
    is no limit) that `totals` has reached, said as "N of M <what>"; None while every budget has room.
    Budgets compare methods at equal cost: tokens (sampling), paths (training rows) or optimizer steps."""
    for key, total, what in BUDGETS:
        limit = int(c.train.get(key, 0) or 0)
        if 0 < limit <= totals.get(total, 0):
            return f"{int(totals[total]):,} of {limit:,} {what}"
    return None


def _setup(c: ConfigDict):
    """Settings, tokenizer, mesh, model (loaded or initialised), reference, optimizer and train state."""
    s = settings_from_config(c)
    tokenizer_path = c.tokenizer_path or c.model.hf_path
    if not tokenizer_path:
        raise ValueError(
            "config.tokenizer_path is empty and there is no config.model.hf_path to take it from"
        )
    key = "config.tokenizer_path" if c.tokenizer_path else "config.model.hf_path (its tokenizer)"
    tokenizer = load_tokenizer(tokenizer_path, key)
    sharder = Sharder(make_mesh(s.mesh))  # every process's devices: one global mesh
    _say(
        f"mesh {dict(sharder.mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s) "
        f"in {jax.process_count()} process(es)"
    )
    if c.model.hf_path:
        cfg, params, _ = load_checkpoint(c.model.hf_path, sharder, **model_overrides(c))
    else:
        cfg, params = s.model, init_sharded_params(s.model, jax.random.key(c.seed), sharder)
    if cfg.param_dtype == "bfloat16" and s.optim.lr < BF16_MIN_LR:
        _say(
            f"warning: config.model.param_dtype=bfloat16 with config.optim.lr={s.optim.lr:g}: a bfloat16 "
            "weight near 0.02 has a rounding step of about 1e-4, so most updates this small round away; "
            "use param_dtype=float32 (float32 master weights, bfloat16 compute)"
        )
    # The frozen reference is the initial policy in the compute dtype; a copy, since the train state's
    # buffers are donated.
    ref_params = None
    if s.loss.kl_coef > 0:
        ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, compute_params(p, cfg)))(params)
    optimizer = make_optimizer(s.optim)
    state = init_sharded_train_state(params, optimizer, sharder, cfg)
    return Job(c, s, sharder, cfg, optimizer, ref_params), tokenizer, state


# Below this learning rate, bfloat16 parameters lose most AdamW updates (ENVIRONMENT.md: a weight of 0.02
# has a rounding step of 1.2e-4, and an update under half of it leaves the weight unchanged).
BF16_MIN_LR = 1e-4


def check_resume(c: ConfigDict, meta: dict | None) -> list:
    """Compares the settings of a checkpoint's record with `c` (`run_record.check_same`): returns the
    accepted differences, raises JobError naming any other."""
    if meta is None or "config" not in meta:
        return []
    return run_record.check_same(
        run_record.fingerprint(meta["config"]),
        run_record.fingerprint(c.to_dict()),
        run_record.accepted_keys(c),
        f"the training run in {os.path.abspath(c.workdir)}",
        "use a new config.workdir",
    )


def run(c: ConfigDict) -> dict:
    """Trains for config.train.steps steps (resuming from config.workdir); returns the last step's metrics."""
    run_record.check_workdir(c.workdir)
    run_record.accepted_keys(c)
    settings_from_config(c)  # every setting checked before anything is built
    ckpt_dir = os.path.join(c.workdir, "ckpt")
    if os.path.isdir(ckpt_dir):  # a resume under other settings stops before the model is built
        look = Checkpointer(ckpt_dir, c.ckpt.max_to_keep)
        meta = look.meta()
        look.close()
        check_resume(c, meta)
    job, tokenizer, state = _setup(c)
    ckpt = Checkpointer(ckpt_dir, c.ckpt.max_to_keep)
    s, cfg = job.s, job.cfg
    problems = read_verl_parquet(c.data.train_path)

    def prompt_len(p):
        out = tokenizer.apply_chat_template(list(p.messages), add_generation_prompt=True, tokenize=True)
        return len(out["input_ids"] if hasattr(out, "keys") else out)

    progress = Progress(
        PromptIterator(problems, c.data.shuffle_seed, prompt_len, c.data.max_prompt_len),
        RunningMean(),
        BatchSizeState(s.algo.batch_size.initial, 0),
        # cumulative over the run, resumes included (a checkpoint from before paths and optimizer steps
        # were counted resumes with them at 0)
        {"generated_tokens": 0, "paths": 0, "optimizer_steps": 0, "elapsed_s": 0.0},
    )
    start = 0
    if ckpt.latest_step() is not None:
        state, meta, arrays, start = ckpt.restore_all(state, say=_say)
        changes = check_resume(c, meta)  # the step restored (an older one when the newest was damaged)
        progress.restore(meta, arrays, functools.partial(tokenizer.decode, skip_special_tokens=True))
        taken = "".join(f"; config.{k}: {old!r} -> {new!r}" for k, old, new in changes)
        _say(f"resumed from step {start} in {ckpt.directory}{taken}")
    if progress.iterator.dropped and start == 0:
        _say(f"dropped {progress.iterator.dropped} prompts longer than {c.data.max_prompt_len} tokens")
    if c.train.mini_batch_rows:
        plan = job.plan(c.train.mini_batch_rows)
        if plan.padded_rows > plan.rows:
            _say(
                f"config.train.mini_batch_rows={plan.rows} on a {job.sharder.batch_parallelism()}-way "
                f"data-parallel mesh: each mini-batch is padded to {plan.padded_rows} rows "
                f"({plan.count} micro-batches of {plan.micro_rows})"
            )
    sampler_params = (
        (lambda p: p) if cfg.param_dtype == cfg.dtype else jax.jit(lambda p: compute_params(p, cfg))
    )

    writer = MetricWriter(c.workdir, resume_step=start)
    lagged = LaggedMetrics()
    held: dict[int, dict] = {}  # host metrics of steps whose device metrics are not fetched yet
    last: dict = {}
    current_step = start

    def log(done):
        """The log stage; stops the run (state saved) on a non-finite update."""
        nonlocal last
        record = log_stage(writer, held, done)
        if record is None:
            return
        last = record
        if record.get("update/finite") == 0.0:
            checkpoint_stage(job, ckpt, progress, state, current_step)
            raise FloatingPointError(
                f"step {done[0]}: non-finite loss or gradient; the update was skipped and the last good "
                f"state is saved in {ckpt.directory} (step {current_step})"
            )

    clock = _Clock()
    # A run resumed with its budget already spent takes no step (it would take one more than the budget
    # allows); raising the budget (config.train.max_generated_tokens, max_paths or max_optimizer_steps)
    # continues it exactly where it stopped.
    spent = budget_spent(c, progress.totals) is not None
    end = start if spent else c.train.steps
    finished = start >= c.train.steps or spent
    mode = "off-policy" if c.train.off_policy else "on-policy"
    offload = bool(c.train.offload_state)
    with VerifierPool(c.reward.workers or None, c.reward.timeout) as pool, PreemptionGuard() as guard:
        policy = sampler_params(state.params)
        # What stays on each chip while the sampler runs (attnrl_jax/memory.py); its cache gets the rest.
        resident = resident_bytes(job.ref_params, policy, None if offload else state)
        budget = cache_gib(c.sampler.cache_gib, device_capacity(), resident, c.sampler.memory_fraction)
        if c.sampler.cache_gib is None:
            _say(
                f"sampler cache budget {budget:.2f} GiB per chip ({c.sampler.memory_fraction:g} of what the "
                f"chip leaves after {resident / 2**30:.2f} GiB resident while sampling)"
            )
        sampler = Sampler(policy, cfg, tokenizer, s.loop, sharder=job.sharder, cache_gib=budget)
        heldout = None
        if c.heldout.every:
            files = eval_job.benchmark_files(c.heldout.data, "config.heldout.data")
            benchmarks = {n: read_verl_parquet(p) for n, p in files.items()}
            held_sampler = Sampler(
                None, cfg, tokenizer, heldout_loop_settings(c), sharder=job.sharder, cache_gib=budget
            )
            heldout = HeldOut(benchmarks, held_sampler, c.heldout.k, c.heldout.every, c.data.max_prompt_len)
        del policy
        # Each process grades its share of the responses; every process gets all verdicts.
        scorer = ShardedScorer(pool.submit)
        score = lambda texts, gts: clock.wrap(scorer(texts, gts))  # noqa: E731
        bar = tqdm(
            range(start, end),
            initial=start,
            total=c.train.steps,
            desc=f"train ({c.algo.preset}, {mode})",
            unit="step",
            disable=not is_main(),
        )
        for step in bar:
            t0 = time.perf_counter()
            clock.waited = 0.0
            sampler.params = sampler_params(state.params)
            state = to_host(state) if offload else state  # the sampler reads only its own copy
            result, generated = sample_stage(job, progress, sampler, score, step)
            sampler.params = None  # the update does not need the sampler's copy on the chips
            state = to_device(state) if offload else state
            t1 = time.perf_counter()
            device_metrics = {}
            if result.batch is not None:
                minibatches, plan = rows_stage(job, result.batch)
                minibatches, device_metrics = reference_stage(job, state.params, minibatches, plan)
                state, device_metrics["minibatches"] = update_stage(job, state, minibatches, plan)
            current_step = step + 1
            if c.algo.adaptive_batch:
                progress.bsz = update_batch_size(progress.bsz, result.num_paths, s.algo.batch_size)
            t2 = time.perf_counter()
            totals = progress.totals
            optimizer_steps = len(device_metrics.get("minibatches", ()))
            after = {
                "generated_tokens": totals["generated_tokens"] + generated,
                "paths": totals["paths"] + result.num_paths,
                "optimizer_steps": totals["optimizer_steps"] + optimizer_steps,
            }
            metrics = dict(result.metrics)
            metrics.update(
                time_sample=t1 - t0 - clock.waited,
                time_score=clock.waited,
                time_update=t2 - t1,
                time_step=t2 - t0,
                total_generated_tokens=after["generated_tokens"],
                total_paths=after["paths"],
                total_optimizer_steps=after["optimizer_steps"],
                total_time_s=totals["elapsed_s"] + (t2 - t0),
                generated_tokens=generated,
                tokens_per_s=generated / max(t1 - t0 - clock.waited, 1e-9),
                next_prompt_batch=progress.bsz.size,
            )
            spent_now = budget_spent(c, after)
            if heldout is not None and heldout.due(
                step + 1, step + 1 == c.train.steps or spent_now is not None
            ):
                t3 = time.perf_counter()
                policy = sampler_params(state.params)
                state = to_host(state) if offload else state  # the evaluation's sampler gets the room
                metrics.update(heldout_stage(heldout, policy, score, step + 1, c.seed))
                del policy
                state = to_device(state) if offload else state
                metrics["time_heldout"] = time.perf_counter() - t3
            held[step + 1] = metrics
            log(lagged.push(step + 1, device_metrics))
            bar.set_postfix(
                acc=f"{metrics['accuracy']:.3f}",
                paths=result.num_paths,
                timeouts=metrics["verifier_timeouts"],
                errors=metrics["verifier_errors"],
                restarts=metrics["verifier_restarts"],
                overflow=metrics["step_overflow"],
                fallback=metrics["needs_fallback"],
            )
            totals.update(after)
            totals["elapsed_s"] += t2 - t0
            if spent_now:
                _say(f"budget spent ({spent_now}): stopping")
            last_step = step + 1 == c.train.steps or spent_now is not None
            finished = finished or last_step
            stop_requested = any_process(guard.requested)  # a preemption notice to any host stops all
            if (step + 1) % c.ckpt.every == 0 or last_step or stop_requested:
                log(lagged.flush())
                checkpoint_stage(job, ckpt, progress, state, step + 1)
            if spent_now:
                break
            if stop_requested:
                # (a notice that reached another process only: this one has no signal of its own)
                why = guard.signal_name or "SIGTERM or Ctrl-C to another process"
                _say(f"{why}: saved step {step + 1} and stopping")
                break
        bar.close()
        log(lagged.flush())
    if c.ckpt.export and finished:
        path = os.path.join(c.workdir, "export", f"step_{current_step}")
        if not _exists_on_main(path):  # every process gathers the params; process 0 writes
            save_checkpoint(path, cfg, state.params, tokenizer=tokenizer)
            _say(f"exported the policy to {path}")
    writer.close()
    ckpt.close()
    return last
