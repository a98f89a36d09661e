"""The built-in task job (`python train.py --config=configs/task.py`): data -> tokenizer -> warm start ->
evaluation -> AttnRL -> evaluation -> report, each stage skipped when its output already exists (a second
run resumes instead of restarting; RL resumes from its latest Orbax checkpoint).

Layout under config.workdir:
  data/train.parquet, data/eval/<family>_l<level>.parquet (config.task.family; levels = steps per
  solution: arith_l2..6, program_l8..10), data/sft.parquet with
  sft_solutions.json (the fallible teacher's warm-start solutions) and sft_references.json (their correct
  solutions, for the warm start's held-out check)
  tokenizer/            Hugging Face tokenizer (BPE trained on the task text, R1-style chat template)
  warm/                 Hugging Face checkpoint of the warm-started policy (with the tokenizer)
  rl/                   the AttnRL run (ckpt/, metrics.jsonl, tb/, export/step_N/)
  eval/warm.{json,md}, eval/final.{json,md}
  report/index.html and its PNG plots
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from ml_collections import ConfigDict

from attnrl_jax import JobError, eval_job, trainer
from attnrl_jax.data import read_verl_parquet, write_verl_parquet
from attnrl_jax.model.hf_io import save_checkpoint
from attnrl_jax.settings import MODEL_OVERRIDES
from attnrl_jax.task import family
from attnrl_jax.task.report import write_report
from attnrl_jax.task.tokenizer import CHAT_TEMPLATE, train_tokenizer
from attnrl_jax.task.warm_start import encode_examples, tiny_task_model, warm_start

STAGES = ("data", "tokenizer", "warm start", "evaluate warm start", "AttnRL", "evaluate final", "report")


class Stages:
    """Announces each stage and records how long each one that ran took in <workdir>/timings.json, summed
    over invocations (an interrupted stage counts once it completes), so a resumed job's total is still the
    whole job's; the report, rewritten every time, counts its latest run."""

    def __init__(self, work: str):
        self.path = os.path.join(work, "timings.json")
        self.seconds: dict[str, float] = _read_json(self.path) or {}
        self._running: tuple[str, float] | None = None

    def start(self, i: int, done: bool) -> None:
        self.finish()
        state = "done, skipped" if done else "running"
        print(f"[{i + 1}/{len(STAGES)}] {STAGES[i]}: {state}", flush=True)
        if not done:
            self._running = (STAGES[i], time.perf_counter())

    def finish(self) -> None:
        """Records the running stage (call it once the last stage is done)."""
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
    return eval_job.run(e)


def prepare(c: ConfigDict, stages: Stages | None = None) -> dict[str, str]:
    """Stages 1-4 (data, tokenizer, warm start, its evaluation); returns the paths of their outputs."""

    work = os.path.abspath(c.workdir)
    stages = stages or Stages(work)
    _stage = stages.start
    data_dir, tok_dir, warm_dir = (os.path.join(work, d) for d in ("data", "tokenizer", "warm"))
    rl_dir, eval_dir = os.path.join(work, "rl"), os.path.join(work, "eval")

    done = os.path.isfile(os.path.join(data_dir, "train.parquet"))
    _stage(0, done)
    if not done:
        make_data(c, data_dir)

    done = os.path.isfile(os.path.join(tok_dir, "tokenizer.json"))
    _stage(1, done)
    if not done:
        make_tokenizer(data_dir, tok_dir)
    # (imported here: transformers loads torch where it is installed, about 2 s a process)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)

    done = os.path.isfile(os.path.join(warm_dir, "config.json"))
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
        save_checkpoint(warm_dir, cfg, params, tokenizer=tokenizer)  # atomic: temp dir + rename
        warm_record = {
            "reached_target_at_step": result.reached_at,
            "steps": result.steps,
            "holdout_exact_match": result.holdout_match,
            "loss_first": losses[0],
            "loss_last_20": float(np.mean(losses[-20:])),
        }
        _write_json(os.path.join(work, "warm_start.json"), warm_record)

    eval_data = os.path.join(data_dir, "eval")
    warm_prefix = os.path.join(eval_dir, "warm")
    done = os.path.isfile(warm_prefix + ".json")
    _stage(3, done)
    if not done:
        evaluate_checkpoint(c, warm_dir, eval_data, warm_prefix)
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
    """The trainer's config for the AttnRL stage: the warm-started policy on the task's training file."""
    rl = ConfigDict(c.to_dict())
    rl.job = "train"
    rl.workdir = workdir or paths["rl"]
    rl.model.hf_path = paths["warm"]
    rl.tokenizer_path = paths["warm"]
    rl.data.train_path = os.path.join(paths["data"], "train.parquet")
    rl.ckpt.export = True
    return rl


def run(c: ConfigDict) -> dict:
    stages = Stages(os.path.abspath(c.workdir))
    _stage = stages.start
    paths = prepare(c, stages)
    work, rl_dir, eval_dir, eval_data = paths["work"], paths["rl"], paths["eval"], paths["eval_data"]
    warm_prefix = paths["warm_eval"]
    rl = rl_config(c, paths)

    done = trainer.latest_export(rl_dir) is not None
    _stage(4, done)
    if not done:
        trainer.run(rl)
    final_dir = trainer.latest_export(rl_dir)
    if final_dir is None:  # stopped early (SIGTERM): the trainer saved its latest step
        print(
            f"stopped during AttnRL; its latest step is saved in {os.path.join(rl_dir, 'ckpt')}. "
            "Run the same command again to resume.",
            flush=True,
        )
        stages.finish()
        return {"interrupted": True}

    final_prefix = os.path.join(eval_dir, "final")
    done = os.path.isfile(final_prefix + ".json")
    _stage(5, done)
    if not done:
        evaluate_checkpoint(c, final_dir, eval_data, final_prefix)

    _stage(6, False)  # the report is cheap and always rewritten

    path = write_report(work, rl, final_dir, samples=c.task.report_samples)
    stages.finish()
    with open(warm_prefix + ".json") as f:
        before = json.load(f)
    with open(final_prefix + ".json") as f:
        after = json.load(f)
    summary = {
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
        f"{100 * summary['accuracy_after']:.1f}% after AttnRL (pass@{k} "
        f"{100 * summary['pass_at_k_before']:.1f}% -> {100 * summary['pass_at_k_after']:.1f}%) in "
        f"{summary['minutes']:.1f} min; report: {path}",
        flush=True,
    )
    return summary
