"""AttnRL against GRPO, TreeRL-style entropy branching, random branching and the paper's Table 2 ablations on
a built-in task, at an equal sampling budget, over several seeds:
`python -m benchmarks.task_comparison --task program [--seeds 0 1 2 3 4] [--ablation-seeds 0 1 2]`.

One shared preparation (data, tokenizer, warm start and its evaluation; configs/task.py for `--task arith`,
configs/program.py for `--task program`), then for each method and seed an RL run from the same warm start
that stops once it has sampled `--budget` tokens, and the evaluation of its final policy. The main methods
(attnrl, grpo, treerl, random_branching) run `--seeds`; the ablation rows (Table 2: ATB with every response
branched, i.e. treerl_atb, against random branching; AttnRL without difficulty-aware expansion, without the
attention filter, without the adaptive batch) run `--ablation-seeds`. Prints, per run, the held-out
accuracy (avg@k) before and after, the steps, tokens and minutes used; per method, the mean gain with a 95%
interval (Student's t over seeds); and training accuracy at equal fractions of the token budget and of the
wall-clock. Writes <workdir>/comparison.json and comparison.png (accuracy against generated tokens and
against wall-clock) and the machine-readable `--output` (benchmarks/results/task_comparison.json: small,
commit it) with the curves beside it (.png). Runs resume: a finished run is not repeated. `--workers 2`
runs two at a time, each on one core (the program task's 32 runs took 66 minutes so on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import numpy as np

METHODS = {  # name: (algo preset, one-step off-policy, other config overrides)
    "attnrl": ("attnrl", True, {}),
    "grpo": ("grpo", False, {}),
    "treerl": ("treerl", False, {}),
    "random_branching": ("random_branching", False, {}),
}
ABLATIONS = {  # the paper's Table 2 rows, from the same warm start
    "atb_all_branched": ("treerl_atb", False, {}),  # ATB vs random_branching: the branching criterion alone
    "attnrl_no_difficulty_expansion": ("attnrl_no_difficulty_expansion", True, {}),
    "attnrl_no_attention_filter": ("attnrl_no_attention_filter", True, {}),
    "attnrl_fixed_batch": ("attnrl", True, {"algo.adaptive_batch": False}),
}
ALL = {**METHODS, **ABLATIONS}
T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
}  # t(0.975, df)


def interval(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (nan with one value)."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan")
    return float(v.mean()), float(T95.get(len(v) - 1, 1.96) * v.std(ddof=1) / np.sqrt(len(v)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="arith", choices=["arith", "program"])
    parser.add_argument("--workdir", default=None, help="default: runs/compare (arith), runs/compare_program")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--ablation-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(ALL), choices=list(ALL))
    parser.add_argument(
        "--output", default=None, help="default: benchmarks/results/task_comparison[_arith].json"
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help="generated tokens per run (default: 800,000 for arith; 160,000 for program, about 4 minutes "
        "of one core for every method: 3-4 AttnRL steps of about 47k tokens, 14 GRPO steps of about 11k)",
    )
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate for every method (default: the config's)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="runs at once, each pinned to one CPU core with single-threaded XLA (default 1: one run "
        "after another, with every core)",
    )
    parser.add_argument("--run", default=None, metavar="METHOD:SEED", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from attnrl_jax.task import pipeline
    from configs import program as program_config
    from configs import task as task_config

    args.budget = args.budget or (800_000 if args.task == "arith" else 160_000)
    args.workdir = args.workdir or ("runs/compare" if args.task == "arith" else "runs/compare_program")
    c = (task_config if args.task == "arith" else program_config).get_config()
    c.workdir = os.path.join(args.workdir, "shared")
    paths = pipeline.prepare(c)
    with open(paths["warm_eval"] + ".json") as f:
        before = json.load(f)["mean"]["avg@k"]

    todo = [
        (method, seed)
        for method in args.methods
        for seed in (args.seeds if method in METHODS else args.ablation_seeds)
    ]
    if args.run:
        method, seed = args.run.rsplit(":", 1)
        todo = [(method, int(seed))]
    pending = [(m, s) for m, s in todo if not os.path.isfile(_final_eval(args.workdir, m, s) + ".json")]
    if args.workers > 1 and not args.run and pending:
        _run_in_workers(args, pending)
    for method, seed in todo:
        _train_and_evaluate(args, c, paths, method, seed)
    if args.run:
        return
    runs = [_record(args.workdir, m, s, before) for m, s in todo]

    print(f"\nheld-out avg@{c.task.eval_k} of the warm start: {100 * before:.1f}%\n")
    print("| method | seed | steps | tokens | minutes | after (%) | gain (points) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(
            f"| {r['method']} | {r['seed']} | {r['steps']} | {r['tokens']:,} | {r['minutes']:.1f} | "
            f"{100 * r['after']:.1f} | {100 * r['gain']:+.1f} |"
        )
    print("\n| method | seeds | mean gain (points) | 95% interval | std over seeds | tokens | minutes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for method in args.methods:
        rs = [r for r in runs if r["method"] == method]
        gains = np.array([r["gain"] for r in rs])
        mean, half = interval(gains)
        spread = float(gains.std(ddof=1)) if len(gains) > 1 else float("nan")
        summary[method] = {
            "gains": [100 * float(g) for g in gains],  # per seed, held-out points
            "seeds": [r["seed"] for r in rs],
            "mean_gain": 100 * mean,
            "ci95": [100 * (mean - half), 100 * (mean + half)],
            "std": 100 * spread,
            "after": [100 * r["after"] for r in rs],
            "tokens": [r["tokens"] for r in rs],
            "minutes": [r["minutes"] for r in rs],
            "preset": ALL[method][0],
            "off_policy": ALL[method][1],
            "overrides": ALL[method][2],
        }
        lo, hi = summary[method]["ci95"]
        tokens, minutes = np.mean(summary[method]["tokens"]), np.mean(summary[method]["minutes"])
        print(
            f"| {method} | {len(rs)} | {100 * mean:+.1f} | [{lo:+.1f}, {hi:+.1f}] | {100 * spread:.1f} | "
            f"{tokens:,.0f} | {minutes:.1f} |"
        )
    print("\nWhat the budget bought (mean per run):")
    print("| method | training paths | continuations | tokens per continuation | optimizer steps |")
    print("|---|---:|---:|---:|---:|")
    for method in args.methods:
        rs = [r for r in runs if r["method"] == method]
        cont = np.mean([r["continuations"] for r in rs])
        tokens = np.sum([r["continuation_tokens"] for r in rs])
        per = tokens / max(np.sum([r["continuations"] for r in rs]), 1)
        print(
            f"| {method} | {np.mean([r['paths'] for r in rs]):,.0f} | {cont:,.0f} | {per:.1f} | "
            f"{np.mean([r['optimizer_steps'] for r in rs]):.1f} |"
        )
    print("\nTraining accuracy (initial responses, mean over seeds and the last 5 steps before the mark):")
    print("| method | 25% tokens | 50% | 75% | 100% | 25% wall-clock | 50% | 75% | 100% |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method in args.methods:
        rs = [r for r in runs if r["method"] == method]
        cells = []
        for key, total in (("curve_tokens", args.budget), ("curve_time", None)):
            for frac in (0.25, 0.5, 0.75, 1.0):
                vals = []
                for r in rs:
                    x = np.array(r[key], float)
                    limit = frac * (total or x[-1]) if frac < 1 else x[-1]  # 100%: the whole run
                    upto = [a for a, t in zip(r["curve_accuracy"], x) if t <= limit][-5:]
                    vals.append(np.mean(upto) if upto else np.nan)
                vals = [v for v in vals if not np.isnan(v)]  # "-": no step of any seed before the mark
                cells.append(f"{100 * np.mean(vals):.1f}" if vals else "-")
        print(f"| {method} | " + " | ".join(cells) + " |")

    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "comparison.json"), "w") as f:
        json.dump({"before": before, "runs": runs, "summary": summary, "budget": args.budget}, f, indent=1)
    _plot(runs, args.methods, os.path.join(args.workdir, "comparison.png"))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    output = args.output or (
        "benchmarks/results/task_comparison.json"
        if args.task == "program"
        else "benchmarks/results/task_comparison_arith.json"
    )
    result = {
        "task": args.task,
        "budget_tokens": args.budget,
        "commit": commit,
        "warm_start_heldout": 100 * before,
        "eval_k": c.task.eval_k,
        "methods": summary,
    }
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(output + ".tmp", output)
    figure = os.path.splitext(output)[0] + ".png"  # the curves beside the JSON (about 200 kB)
    _plot(runs, args.methods, figure)
    print(f"\nwrote {args.workdir}/comparison.json, comparison.png, {output} and {figure}")


def _run_dir(workdir: str, method: str, seed: int) -> str:
    return os.path.join(workdir, f"{method}_seed{seed}")


def _final_eval(workdir: str, method: str, seed: int) -> str:
    return os.path.join(_run_dir(workdir, method, seed), "eval", "final")


def _train_and_evaluate(args, c, paths, method: str, seed: int) -> None:
    """One RL run from the shared warm start, stopped at the token budget, and its held-out evaluation;
    each skipped when its output exists (a finished run is not repeated, an interrupted one resumes)."""
    from attnrl_jax import trainer
    from attnrl_jax.task import pipeline

    preset, off_policy, overrides = ALL[method]
    work = _run_dir(args.workdir, method, seed)
    rl = pipeline.rl_config(c, paths, workdir=work)
    rl.seed = seed
    rl.algo.preset = preset
    rl.train.off_policy = off_policy
    rl.train.steps = args.max_steps
    rl.train.max_generated_tokens = args.budget
    for key, value in overrides.items():
        section, field = key.split(".")
        rl[section][field] = value
    if args.lr is not None:
        rl.optim.lr = args.lr
    if trainer.latest_export(work) is None:
        print(f"== {method}_seed{seed}", flush=True)
        trainer.run(rl)
    out = _final_eval(args.workdir, method, seed)
    if not os.path.isfile(out + ".json"):
        pipeline.evaluate_checkpoint(c, trainer.latest_export(work), paths["eval_data"], out)


def _record(workdir: str, method: str, seed: int, before: float) -> dict:
    from attnrl_jax.report import read_metrics

    with open(_final_eval(workdir, method, seed) + ".json") as f:
        after = json.load(f)["mean"]["avg@k"]
    records = read_metrics(os.path.join(_run_dir(workdir, method, seed), "metrics.jsonl"))
    return {
        "method": method,
        "seed": seed,
        "before": before,
        "after": after,
        "gain": after - before,
        "steps": len(records),
        "tokens": records[-1]["total_generated_tokens"],
        "minutes": records[-1]["total_time_s"] / 60,
        "curve_tokens": [r["total_generated_tokens"] for r in records],
        "curve_time": [r["total_time_s"] for r in records],
        "curve_accuracy": [r["accuracy"] for r in records],
        # What the budget bought: training paths, continuations and their tokens, optimizer steps.
        "paths": sum(r["num_paths"] for r in records),
        "continuations": sum(r.get("num_continuations", 0) for r in records),
        "continuation_tokens": sum(r.get("continuation_tokens", 0) for r in records),
        "optimizer_steps": sum(r.get("update/optimizer_steps", 0) for r in records),
    }


def _run_in_workers(args, pending) -> None:
    """Runs the pending (method, seed) runs `--workers` at a time, each pinned to one CPU core with
    single-threaded XLA (`--run METHOD:SEED` of this module; benchmarks.workers), so that every run's
    minutes are one core's. Each run's output goes to <workdir>/<method>_seed<seed>/worker.log; a failed
    run stops the comparison with its log's path."""
    import sys

    from benchmarks.workers import run_pinned

    base = [sys.executable, "-m", "benchmarks.task_comparison", "--task", args.task]
    base += ["--workdir", args.workdir, "--budget", str(args.budget), "--max-steps", str(args.max_steps)]
    if args.lr is not None:
        base += ["--lr", str(args.lr)]
    # Seed-major, so that an interrupted comparison has every method at its first seeds.
    order = {m: i for i, m in enumerate(ALL)}
    queue = sorted(pending, key=lambda ms: (ms[1], order[ms[0]]))
    jobs = [
        (
            f"{m}_seed{s}",
            base + ["--run", f"{m}:{s}"],
            os.path.join(_run_dir(args.workdir, m, s), "worker.log"),
        )
        for m, s in queue
    ]
    run_pinned(jobs, args.workers)


def _plot(runs, methods, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, method in enumerate(methods):
        for j, r in enumerate(x for x in runs if x["method"] == method):
            # A mean of up to 5 steps, at most a third of the run (a 5-step run is drawn step by step).
            w = max(1, min(5, len(r["curve_accuracy"]) // 3))
            acc = np.convolve(r["curve_accuracy"], np.ones(w) / w, mode="valid")
            for ax, key, scale in ((axes[0], "curve_tokens", 1e3), (axes[1], "curve_time", 60)):
                x = np.array(r[key][w - 1 :], float) / scale
                ax.plot(x, acc, ".-", color=f"C{i}", alpha=0.6, label=method if j == 0 else None)
    axes[0].set_xlabel("generated tokens (thousands)")
    axes[1].set_xlabel("wall-clock (minutes)")
    for ax in axes:
        ax.set_ylabel("training accuracy (running mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
