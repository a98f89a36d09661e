"""Does the built-in task's warm start converge on every seed? `python -m benchmarks.warm_start_seeds
[--config configs/program.py] [--seeds 0 1 2 3 4] [--workers 2] [--set task.warm_batch=8 ...]`.

Runs only the job's first three stages (data, tokenizer, warm start: `task.pipeline.make_data`,
`make_tokenizer`, `run_warm_start`, the code `train.py` runs) for each task seed, in its own process and
workdir (`<workdir>/seed<S>`, default runs/warm_start_seeds; a seed with a result.json is not run again),
and prints per seed the step at which the held-out exact match met `task.warm_target` (or that it never
did within `task.warm_steps`), the exact match after the cool-down, the steps and the minutes; then writes
<workdir>/warm_start_seeds.json. `--workers 2` runs two seeds at once, each pinned to one core with
single-threaded XLA (`benchmarks.workers`). The whole job per seed, RL included, is `benchmarks.task_seeds`;
this is the cheaper check of the stage that decides whether RL can start at all.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, seed: int, sets: list[str]):
    """The config module at `path` (configs/task.py or configs/program.py) with task.seed and `sets`
    ("a.b=value", parsed as the existing value's type) applied."""
    from attnrl_jax.cli import apply_sets

    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    c = module.get_config()
    c.task.seed = seed
    apply_sets(c, sets)
    return c


def run_one(config: str, seed: int, sets: list[str], work: str) -> None:
    from transformers import AutoTokenizer

    from attnrl_jax.task import pipeline

    c = load_config(config, seed, sets)
    data_dir, tok_dir = os.path.join(work, "data"), os.path.join(work, "tokenizer")
    if not os.path.isfile(os.path.join(data_dir, "train.parquet")):
        pipeline.make_data(c, data_dir)
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        pipeline.make_tokenizer(data_dir, tok_dir)
    start = time.perf_counter()
    _, result = pipeline.run_warm_start(c, data_dir, AutoTokenizer.from_pretrained(tok_dir))
    seconds = time.perf_counter() - start
    record = {
        "seed": seed,
        "reached_target_at_step": result.reached_at,
        "steps": result.steps,
        "holdout_exact_match": result.holdout_match,
        "target": c.task.warm_target,
        "warm_steps": c.task.warm_steps,
        "warm_batch": c.task.warm_batch,
        "warm_lr": c.task.warm_lr,
        "minutes": seconds / 60,
        "sets": sets,
    }
    with open(os.path.join(work, "result.json.tmp"), "w") as f:
        json.dump(record, f, indent=1)
    os.replace(os.path.join(work, "result.json.tmp"), os.path.join(work, "result.json"))
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default="configs/program.py", choices=["configs/task.py", "configs/program.py"]
    )
    parser.add_argument("--workdir", default="runs/warm_start_seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--workers", type=int, default=1, help="seeds at once, each on one core")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config override a.b=value")
    parser.add_argument("--run", type=int, default=None, help=argparse.SUPPRESS)  # one seed, in this process
    args = parser.parse_args()

    def work(seed: int) -> str:
        return os.path.abspath(os.path.join(args.workdir, f"seed{seed}"))

    if args.run is not None:
        os.makedirs(work(args.run), exist_ok=True)
        run_one(args.config, args.run, args.sets, work(args.run))
        return
    for seed in args.seeds:
        load_config(args.config, seed, args.sets)  # a bad --set fails here, before any run
    pending = [s for s in args.seeds if not os.path.isfile(os.path.join(work(s), "result.json"))]

    def argv(seed: int) -> list[str]:
        sets = [f"--set={s}" for s in args.sets]
        return [sys.executable, "-m", "benchmarks.warm_start_seeds", "--config", args.config, "--workdir",
                args.workdir, "--run", str(seed), *sets]  # fmt: skip

    failed = {}
    if args.workers > 1 and pending:
        from benchmarks.workers import run_pinned

        jobs = [(str(s), argv(s), os.path.join(work(s), "job.log")) for s in pending]
        failed = run_pinned(jobs, args.workers, ROOT, True)
    else:
        for seed in pending:
            if subprocess.run(argv(seed), cwd=ROOT).returncode != 0:
                failed[str(seed)] = 1
    if failed:
        sys.exit(f"error: seeds {', '.join(failed)} crashed; see their job.log under {args.workdir}")

    rows = []
    for seed in args.seeds:
        with open(os.path.join(work(seed), "result.json")) as f:
            rows.append(json.load(f))
    print("\n| task seed | target met at step | exact match after the cool-down | steps | minutes |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        met = r["reached_target_at_step"]
        met = f"{met:,}" if met is not None else f"**not met** within {r['warm_steps']:,}"
        print(
            f"| {r['seed']} | {met} | {r['holdout_exact_match']:.2f} | {r['steps']:,} | {r['minutes']:.1f} |"
        )
    reached = [r["reached_target_at_step"] for r in rows if r["reached_target_at_step"] is not None]
    print(
        f"\n{len(reached)} of {len(rows)} seeds met the target"
        + (
            f"; steps: median {np.median(reached):,.0f}, range {min(reached):,}-{max(reached):,}"
            if reached
            else ""
        )
    )
    out = os.path.join(args.workdir, "warm_start_seeds.json")
    with open(out + ".tmp", "w") as f:
        json.dump({"config": args.config, "sets": args.sets, "seeds": rows}, f, indent=1)
    os.replace(out + ".tmp", out)
    if len(reached) < len(rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
