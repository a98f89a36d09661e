"""The built-in task job (`python train.py --config=configs/task.py`): data -> tokenizer -> warm start ->
evaluation -> RL (AttnRL, or the method config.algo.preset names) -> evaluation -> report. Each finished
stage records the settings it ran with in <workdir>/stages.json; a second run skips the stages whose record
matches its settings (RL resumes from its latest Orbax checkpoint) and stops, naming the keys, when a
recorded stage ran under other settings (`attnrl_jax/run_record.py`; `--config.accept_changes=train.steps`
extends a finished run). Every setting is checked before stage 1.

Layout under config.workdir:
  data/train.parquet, data/eval/<family>_l<level>.parquet (config.task.family; levels = steps per
  solution: arith_l2..6, program_l8..10), data/sft.parquet with
  sft_solutions.json (the fallible teacher's warm-start solutions) and sft_references.json (their correct
  solutions, for the warm start's held-out check)
  tokenizer/            Hugging Face tokenizer (BPE trained on the task text, R1-style chat template)
  warm/                 Hugging Face checkpoint of the warm-started policy (with the tokenizer)
  rl/                   the RL run (ckpt/, metrics.jsonl, tb/, export/step_N/)
  stages.json           each finished stage's settings (and the policy the final evaluation read)
  runs.jsonl            one line per invocation: command, overrides, commit, time, host
  eval/warm.{json,md}, eval/final.{json,md}
  report/index.html and its PNG plots
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
from ml_collections import ConfigDict

from attnrl_jax import JobError, eval_job, run_record, trainer
from attnrl_jax.algo.config import method_label
from attnrl_jax.data import read_verl_parquet, write_verl_parquet
from attnrl_jax.memory import check_memory_settings
from attnrl_jax.model.hf_io import load_tokenizer, save_checkpoint
from attnrl_jax.settings import MODEL_OVERRIDES, settings_from_config
from attnrl_jax.task import family
from attnrl_jax.task.report import write_report
from attnrl_jax.task.tokenizer import CHAT_TEMPLATE, train_tokenizer
from attnrl_jax.task.warm_start import encode_examples, tiny_task_model, warm_start

STAGES = ("data", "tokenizer", "warm start", "evaluate warm start", "RL", "evaluate final", "report")


def method_name(c: ConfigDict) -> str:
    """What stage 5, the summary and the report call the method actually run."""
    return method_label(c.algo.preset)


# The settings each stage's output depends on (run_record prefixes); a stage's record holds their values and
# those of the stages before it. RL depends on every setting but the evaluation's and the report's.
_DATA = ("task.family", "task.seed", "task.train_per_level", "task.sft_per_level", "task.eval_per_level")
_DATA += ("task.slip_rate",)
_WARM = _DATA + ("task.model_layers", "task.model_heads", "task.model_kv_heads", "task.warm_steps")
_WARM += ("task.warm_target", "task.warm_cooldown", "task.warm_batch", "task.warm_lr")
_WARM += ("data.max_prompt_len", "sampler.max_new_tokens")
_EVAL = ("task.eval_k", "task.eval_temperature", "seed", "model", "reward.timeout")
STAGE_KEYS = {
    "data": _DATA,
    "tokenizer": _DATA,
    "warm start": _WARM,
    "evaluate warm start": _WARM + _EVAL,
    "RL": None,  # everything but _EVAL's task keys
    "evaluate final": None,  # everything, and the exported policy it evaluated
}


def stage_settings(c: ConfigDict, stage: str) -> dict:
    """The fingerprint (`run_record.fingerprint`) of the settings `stage` of config `c` depends on."""
    prefixes = STAGE_KEYS[stage]
    if stage == "RL":
        keep = lambda k: not run_record.under(k, ("task.eval_k", "task.eval_temperature"))  # noqa: E731
    elif prefixes is None:
        keep = None
    else:
        keep = lambda k: run_record.under(k, prefixes)  # noqa: E731
    return run_record.fingerprint(c.to_dict(), keep)


class Stages:
    """Announces each stage, keeps each finished stage's record in <workdir>/stages.json (the settings it
    ran with, so a rerun under other settings stops instead of reusing it) and how long each one that ran
    took in <workdir>/timings.json, summed over invocations (an interrupted stage counts once it
    completes), so a resumed job's total is still the whole job's; the report, rewritten every time, counts
    its latest run.

    A stage is done when its record says so and matches the settings now: never because a file exists."""

    def __init__(self, work: str, c: ConfigDict | None = None):
        self.work = work
        self.c = c
        self.path = os.path.join(work, "timings.json")
        self.records_path = os.path.join(work, "stages.json")
        self.seconds: dict[str, float] = _read_json(self.path) or {}
        self.records: dict[str, dict] = _read_json(self.records_path) or {}
        self.label = method_name(c) if c is not None else "RL"
        self._running: tuple[str, float] | None = None

    def name(self, i: int) -> str:
        return self.label if STAGES[i] == "RL" else STAGES[i]

    def check(self, c: ConfigDict) -> None:
        """Before any stage runs: every recorded stage's settings against `c` (JobError naming the keys
        that differ, unless accepted), and a workdir made before stage records existed refused."""
        legacy = [
            d for d in ("tokenizer", "warm", "rl", "eval") if os.path.exists(os.path.join(self.work, d))
        ]
        if legacy and not os.path.isfile(self.records_path):
            raise JobError(
                f"{self.work} holds a task run ({', '.join(legacy)}) without {self.records_path}: it was "
                "made by an earlier version that did not record its settings, so nothing in it can be reused "
                "safely.\nUse a new config.workdir (or delete this one)."
            )
        accepted = run_record.accepted_keys(c)
        for stage, record in self.records.items():
            if stage in STAGE_KEYS:
                run_record.check_same(
                    record["settings"],
                    stage_settings(c, stage),
                    accepted,
                    f"stage '{self._recorded_name(stage, record)}' of the task run in {self.work}",
                    "use a new config.workdir",
                )

    @staticmethod
    def _recorded_name(stage: str, record: dict) -> str:
        preset = record["settings"].get("algo.preset")
        return method_label(preset) if stage == "RL" and preset else stage

    def done(self, stage: str, c: ConfigDict, **outputs) -> bool:
        """Whether `stage` finished under the settings of `c` (and made `outputs`, e.g. the policy an
        evaluation read)."""
        record = self.records.get(stage)
        return (
            record is not None
            and record["settings"] == stage_settings(c, stage)
            and all(record.get(k) == v for k, v in outputs.items())
        )

    def record(self, stage: str, c: ConfigDict, **outputs) -> None:
        """Marks `stage` finished under `c`; unless it made what its record already said (the same settings
        and outputs), the stages after it lose their records (they read its output)."""
        record = {"settings": stage_settings(c, stage), **outputs}
        if self.records.get(stage) != record:
            after = STAGES[STAGES.index(stage) + 1 :]
            self.records = {k: v for k, v in self.records.items() if k not in after}
        self.records[stage] = record
        os.makedirs(self.work, exist_ok=True)
        _write_json(self.records_path, self.records)

    def start(self, i: int, done: bool) -> None:
        self.finish()
        state = "done, skipped" if done else "running"
        print(f"[{i + 1}/{len(STAGES)}] {self.name(i)}: {state}", flush=True)
        if not done:
            self._running = (STAGES[i], time.perf_counter())

    def finish(self) -> None:
        """Records the running stage's time (call it once the last stage is done)."""
        if self._running is None:
            return
        name, t0 = self._running
        self._running = None
        spent = time.perf_counter() - t0
        self.seconds[name] = spent if name == STAGES[-1] else self.seconds.get(name, 0.0) + spent
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        _write_json(self.path, self.seconds)

    @property
    def total_minutes(self) -> float:
        return sum(self.seconds.values()) / 60


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def make_data(c: ConfigDict, root: str) -> None:
    """Training, warm-start and per-level evaluation problems of config.task.family, from three disjoint
    seeds."""
    gen = family(c.task.family)
    make_split = gen.make_split
    os.makedirs(os.path.join(root, "eval"), exist_ok=True)
    seed = c.task.seed
    train, _ = make_split(seed * 3 + 1, c.task.train_per_level)
    # The warm start's solutions come from a fallible teacher; the same problems' correct solutions are the
    # references of its held-out check.
    sft, solutions = make_split(seed * 3 + 2, c.task.sft_per_level, slip_rate=c.task.slip_rate)
    _, references = make_split(seed * 3 + 2, c.task.sft_per_level)
    evals, _ = make_split(seed * 3 + 3, c.task.eval_per_level)
    for level in gen.LEVELS:
        name = f"{c.task.family}_l{level}"
        write_verl_parquet(
            os.path.join(root, "eval", f"{name}.parquet"), [p for p in evals if p.data_source == name]
        )
    write_verl_parquet(os.path.join(root, "sft.parquet"), sft)
    _write_json(os.path.join(root, "sft_solutions.json"), solutions)
    _write_json(os.path.join(root, "sft_references.json"), references)
    write_verl_parquet(os.path.join(root, "train.parquet"), train)  # written last: marks the stage done


def _load_sft(data_dir: str, kind: str = "solutions"):
    """The warm-start problems and their teacher's solutions (or, with kind="references", their correct
    solutions) written by `make_data`."""
    with open(os.path.join(data_dir, f"sft_{kind}.json")) as f:
        return read_verl_parquet(os.path.join(data_dir, "sft.parquet")), json.load(f)


def make_tokenizer(data_dir: str, tok_dir: str) -> None:
    """Trains the task's tokenizer on the warm-start questions and solutions (`make_data`'s) into tok_dir."""

    sft, solutions = _load_sft(data_dir)
    tmp = tok_dir + ".tmp"
    train_tokenizer([p.question for p in sft] + solutions + [CHAT_TEMPLATE], tmp)
    os.replace(tmp, tok_dir)


def run_warm_start(c: ConfigDict, data_dir: str, tokenizer, progress: bool = True):
    """The warm start of config `c` on `make_data`'s examples: (the model config, `WarmStartResult`)."""

    sft, solutions = _load_sft(data_dir)
    _, references = _load_sft(data_dir, "references")
    cfg = tiny_task_model(
        len(tokenizer),
        tokenizer.eos_token_id,
        c.task.model_layers,
        c.task.model_heads,
        c.task.model_kv_heads,
    )
    length = c.data.max_prompt_len + c.sampler.max_new_tokens
    tokens, mask = encode_examples(tokenizer, sft, solutions, length)
    # Held out from the warm start for its stopping rule: the first 5% of the problems, with their
    # correct solutions (the rule asks whether the model has the procedure, not the teacher's slips).
    holdout = max(len(tokens) // 20, 1)
    held = encode_examples(tokenizer, sft[:holdout], references[:holdout], length)
    return cfg, warm_start(
        cfg,
        tokens[holdout:],
        mask[holdout:],
        steps=c.task.warm_steps,
        batch_size=c.task.warm_batch,
        lr=c.task.warm_lr,
        seed=c.task.seed,
        holdout=held,
        target=c.task.warm_target,
        cooldown=c.task.warm_cooldown,
        progress=progress,
    )


def evaluate_checkpoint(c: ConfigDict, checkpoint: str, data: str, output: str) -> dict:
    return eval_job.run(eval_config(c, checkpoint, data, output))


def eval_config(c: ConfigDict, checkpoint: str, data: str, output: str) -> ConfigDict:
    """The evaluation job's config for one of the task's evaluations (`evaluate_checkpoint`)."""
    e = eval_job.default_config()
    e.checkpoint = checkpoint
    e.seed = c.seed
    for key in MODEL_OVERRIDES:
        if key in c.model:
            e.model[key] = c.model[key]
    e.mesh = c.mesh
    e.eval.data = data
    e.eval.k = c.task.eval_k
    e.eval.max_new_tokens = c.sampler.max_new_tokens
    e.eval.max_prompt_len = c.data.max_prompt_len
    e.eval.temperature = c.task.eval_temperature
    e.eval.output = output
    e.reward = c.reward
    return e


def _clear(path: str) -> None:
    """Removes a stage's output that has no record (an interrupted stage's), before the stage runs again."""
    if os.path.isdir(path):
        shutil.rmtree(path)


def validate(c: ConfigDict) -> None:
    """Every setting of the task job, before stage 1 (ValueError/JobError naming the key): the task's own,
    the RL stage's (as the trainer checks them), the evaluations' and the accepted changes."""
    run_record.check_workdir(c.workdir)
    run_record.accepted_keys(c)
    family(c.task.family)
    for key in ("train_per_level", "sft_per_level", "eval_per_level", "warm_steps", "warm_batch", "eval_k"):
        if c.task[key] < 1:
            raise ValueError(f"config.task.{key} must be at least 1, got {c.task[key]}")
    if not 0 <= c.task.slip_rate < 1:
        raise ValueError(f"config.task.slip_rate must be in [0, 1), got {c.task.slip_rate}")
    if not c.task.warm_lr > 0:
        raise ValueError(f"config.task.warm_lr must be positive, got {c.task.warm_lr}")
    if c.task.report_samples < 0:
        raise ValueError(f"config.task.report_samples must be 0 or positive, got {c.task.report_samples}")
    # The RL stage's settings, as the trainer checks them; its model is the warm start's (built in stage 3),
    # so the model settings are checked on the tiny preset.
    rl = ConfigDict(c.to_dict())
    rl.model.preset = rl.model.preset or "tiny"
    settings_from_config(rl, check_paths=False)
    e = eval_config(c, "", "", "")
    check_memory_settings(e.eval, "eval")


def prepare(c: ConfigDict, stages: Stages | None = None) -> dict[str, str]:
    """Stages 1-4 (data, tokenizer, warm start, its evaluation); returns the paths of their outputs."""

    work = os.path.abspath(c.workdir)
    if stages is None:
        validate(c)
        stages = Stages(work, c)
        stages.check(c)
    _stage = stages.start
    data_dir, tok_dir, warm_dir = (os.path.join(work, d) for d in ("data", "tokenizer", "warm"))
    rl_dir, eval_dir = os.path.join(work, "rl"), os.path.join(work, "eval")

    done = stages.done("data", c)
    _stage(0, done)
    if not done:
        make_data(c, data_dir)
        stages.record("data", c)

    done = stages.done("tokenizer", c)
    _stage(1, done)
    if not done:
        _clear(tok_dir)
        make_tokenizer(data_dir, tok_dir)
        stages.record("tokenizer", c)
    tokenizer = load_tokenizer(tok_dir, "the task's tokenizer")

    done = stages.done("warm start", c)
    _stage(2, done)
    if not done:
        cfg, result = run_warm_start(c, data_dir, tokenizer)
        losses = result.losses
        if result.reached_at is None:
            raise JobError(
                f"warm start: after {result.steps} steps (config.task.warm_steps) the held-out exact match "
                f"is {result.holdout_match:.2f}, below config.task.warm_target={c.task.warm_target}: the "
                "model did not learn the task, so RL is not started. Nothing was saved; rerun with a larger "
                "config.task.warm_steps (or another config.task.seed)."
            )
        print(
            f"warm start: held-out exact match reached {c.task.warm_target} at step {result.reached_at}, "
            f"{result.holdout_match:.2f} after the cool-down ({result.steps} steps); loss "
            f"{losses[0]:.3f} -> {np.mean(losses[-20:]):.3f}",
            flush=True,
        )
        params = result.params
        _clear(warm_dir)
        save_checkpoint(warm_dir, cfg, params, tokenizer=tokenizer)  # atomic: temp dir + rename
        warm_record = {
            "reached_target_at_step": result.reached_at,
            "steps": result.steps,
            "holdout_exact_match": result.holdout_match,
            "loss_first": losses[0],
            "loss_last_20": float(np.mean(losses[-20:])),
        }
        _write_json(os.path.join(work, "warm_start.json"), warm_record)
        stages.record("warm start", c)

    eval_data = os.path.join(data_dir, "eval")
    warm_prefix = os.path.join(eval_dir, "warm")
    done = stages.done("evaluate warm start", c)
    _stage(3, done)
    if not done:
        evaluate_checkpoint(c, warm_dir, eval_data, warm_prefix)
        stages.record("evaluate warm start", c)
    stages.finish()

    return {
        "work": work,
        "data": data_dir,
        "eval_data": eval_data,
        "warm": warm_dir,
        "rl": rl_dir,
        "eval": eval_dir,
        "warm_eval": warm_prefix,
    }


def rl_config(c: ConfigDict, paths: dict[str, str], workdir: str | None = None) -> ConfigDict:
    """The trainer's config for the RL stage: the warm-started policy on the task's training file, with
    held-out evaluations every config.heldout.every steps on the task's evaluation problems."""
    rl = ConfigDict(c.to_dict())
    rl.job = "train"
    rl.workdir = workdir or paths["rl"]
    rl.model.hf_path = paths["warm"]
    rl.tokenizer_path = paths["warm"]
    rl.data.train_path = os.path.join(paths["data"], "train.parquet")
    rl.ckpt.export = True
    # Held-out curves on the evaluation problems, with the before/after evaluations' k and temperature.
    rl.heldout.data = os.path.join(paths["data"], "eval")
    rl.heldout.k = c.task.eval_k
    rl.heldout.temperature = c.task.eval_temperature
    return rl


def run(c: ConfigDict) -> dict:
    validate(c)
    stages = Stages(os.path.abspath(c.workdir), c)
    stages.check(c)  # a rerun under other settings stops here, before any stage runs
    os.makedirs(stages.work, exist_ok=True)
    with open(os.path.join(stages.work, "runs.jsonl"), "a") as f:  # who ran it, with what, when
        f.write(json.dumps(run_record.identity()) + "\n")
    _stage = stages.start
    paths = prepare(c, stages)
    work, rl_dir, eval_dir, eval_data = paths["work"], paths["rl"], paths["eval"], paths["eval_data"]
    warm_prefix = paths["warm_eval"]
    rl = rl_config(c, paths)
    method = stages.label

    done = stages.done("RL", c) and os.path.isdir(os.path.join(work, stages.records["RL"]["export"]))
    _stage(4, done)
    if not done:
        trainer.run(rl)
        final_dir = trainer.finished_export(rl_dir)
        if final_dir is None:  # stopped early (SIGTERM, Ctrl-C): the trainer saved its latest step
            print(
                f"stopped during {method}; its latest step is saved in {os.path.join(rl_dir, 'ckpt')}. "
                "Run the same command again to resume.",
                flush=True,
            )
            stages.finish()
            return {"interrupted": True}
        stages.record("RL", c, export=os.path.relpath(final_dir, work))
    final_dir = os.path.join(work, stages.records["RL"]["export"])

    final_prefix = os.path.join(eval_dir, "final")
    policy = os.path.relpath(final_dir, work)
    done = stages.done("evaluate final", c, policy=policy)
    _stage(5, done)
    if not done:
        evaluate_checkpoint(c, final_dir, eval_data, final_prefix)
        stages.record("evaluate final", c, policy=policy)

    _stage(6, False)  # the report is cheap and always rewritten

    path = write_report(work, rl, final_dir, samples=c.task.report_samples)
    stages.finish()
    with open(warm_prefix + ".json") as f:
        before = json.load(f)
    with open(final_prefix + ".json") as f:
        after = json.load(f)
    summary = {
        "method": method,
        "algo_preset": c.algo.preset,
        "seed": c.task.seed,
        "accuracy_before": before["mean"]["avg@k"],
        "accuracy_after": after["mean"]["avg@k"],
        "pass_at_k_before": before["mean"]["pass@k"],
        "pass_at_k_after": after["mean"]["pass@k"],
        "k": c.task.eval_k,
        "levels": {
            name: [before["benchmarks"][name]["avg@k"], after["benchmarks"][name]["avg@k"]]
            for name in before["benchmarks"]
        },
        "warm_start": _read_json(os.path.join(work, "warm_start.json")),
        "minutes": stages.total_minutes,  # the whole job's, summed over resumed invocations
        "stage_seconds": dict(stages.seconds),
    }
    _write_json(os.path.join(work, "summary.json"), summary)
    k = c.task.eval_k
    print(
        f"built-in task avg@{k}: {100 * summary['accuracy_before']:.1f}% after the warm start -> "
        f"{100 * summary['accuracy_after']:.1f}% after {method} (pass@{k} "
        f"{100 * summary['pass_at_k_before']:.1f}% -> {100 * summary['pass_at_k_after']:.1f}%) in "
        f"{summary['minutes']:.1f} min; report: {path}",
        flush=True,
    )
    return summary
