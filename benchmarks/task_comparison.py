"""AttnRL against GRPO, TreeRL-style entropy branching, random branching and the paper's Table 2 ablations on
a built-in task, at an equal sampling budget, over several seeds:
`python -m benchmarks.task_comparison --task program [--seeds 0 1 2 3 4] [--ablation-seeds 0 1 2]`.

One shared preparation (data, tokenizer, warm start and its evaluation; configs/task.py for `--task arith`,
configs/program.py for `--task program`), then for each method and seed an RL run from the same warm start
that stops once it has sampled `--budget` tokens, and the held-out evaluation of its policy at
`--heldout-marks` fractions of the budget (default 25/50/75%: the run stops at each mark, is evaluated and
resumes exactly) and at the end. The main methods
(attnrl, grpo, treerl, random_branching) run `--seeds`; the ablation rows (Table 2: ATB with every response
branched, i.e. treerl_atb, against random branching; AttnRL without difficulty-aware expansion, without the
attention filter, without the adaptive batch) run `--ablation-seeds`. Prints, per run, the held-out
accuracy (avg@k) before and after, the steps, tokens and minutes used; per method, the mean gain with a 95%
interval (Student's t over seeds); held-out accuracy at each mark with its tokens and minutes; and training
accuracy at equal fractions of the token budget and of the wall-clock. Writes <workdir>/comparison.json and
comparison.png (held-out and training accuracy against generated tokens and against wall-clock) and the
machine-readable `--output` (benchmarks/results/task_comparison.json: small, commit it) with the curves
beside it (.png). Runs resume: a finished run is not repeated. `--workers 2` runs two at a time, each on
one core (the program task's 32 runs, without marks, took 66 minutes so on a 2-core CPU). A run's
wall-clock is the sum of its steps' times (evaluations excluded); each resumed stage compiles again in its
first step, which adds to it.
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
        help="generated tokens per run (default: 800,000 for arith; 160,000 for program, about 3 minutes "
        "of one core for every method: 5 AttnRL steps of about 36k tokens, 11 GRPO steps of about 16k; at "
        "configs/program.py's RL rate of 1e-4 no method moves held-out accuracy in it; at 480,000, about "
        "3x the minutes, GRPO gained 3.9 points and TreeRL 2.7, on every one of 3 seeds, random branching "
        "1.5 and AttnRL 0.9: benchmarks/RESULTS.md)",
    )
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument(
        "--heldout-marks",
        type=float,
        nargs="*",
        default=[0.25, 0.5, 0.75],
        help="fractions of the budget at which each run's policy is also evaluated on the held-out set "
        "(the curves; about half a minute of one core each); none: only before and after",
    )
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
    parser.add_argument(
        "--toy",
        action="store_true",
        help="the configs' :toy variant: every stage runs at toy sizes and nothing learns (checks the "
        "harness in minutes; give --workdir, --output and a --budget of a few thousand tokens)",
    )
    parser.add_argument("--run", default=None, metavar="METHOD:SEED", help=argparse.SUPPRESS)
    args = parser.parse_args()
    bad = [f for f in args.heldout_marks if not 0 < f < 1]
    if bad:
        parser.error(
            f"--heldout-marks {bad}: each mark is a fraction of the budget, strictly between 0 and 1"
        )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from attnrl_jax.task import pipeline
    from configs import program as program_config
    from configs import task as task_config

    args.budget = args.budget or (800_000 if args.task == "arith" else 160_000)
    args.workdir = args.workdir or ("runs/compare" if args.task == "arith" else "runs/compare_program")
    c = (task_config if args.task == "arith" else program_config).get_config("toy" if args.toy else "")
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
    runs = [_record(args.workdir, m, s, before, args.heldout_marks) for m, s in todo]

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
    print(
        f"\nHeld-out avg@{c.task.eval_k} (%) at fractions of the token budget, mean over seeds (the policy "
        "exported at the first step that reached the mark; its mean tokens and minutes in brackets):"
    )
    fractions = [0.0, *sorted(args.heldout_marks), 1.0]
    print("| method | " + " | ".join(f"{round(100 * f)}%" for f in fractions) + " |")
    print("|---|" + "---:|" * len(fractions))
    for method in args.methods:
        curve = _mean_curve([r for r in runs if r["method"] == method], fractions)
        summary[method]["heldout_curve"] = curve
        cells = [
            f"{p['accuracy']:.1f} ({p['tokens'] / 1e3:.0f}k, {p['minutes']:.1f} min)" if p["seeds"] else "-"
            for p in curve
        ]
        print(f"| {method} | " + " | ".join(cells) + " |")
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


def _mark_eval(workdir: str, method: str, seed: int, fraction: float) -> str:
    if fraction >= 1.0:
        return _final_eval(workdir, method, seed)
    return os.path.join(_run_dir(workdir, method, seed), "eval", f"at_{round(100 * fraction)}pct")


def _train_and_evaluate(args, c, paths, method: str, seed: int) -> None:
    """One RL run from the shared warm start, stopped at the token budget, with the held-out evaluation of
    its policy at each `--heldout-marks` fraction of the budget and at the end. The run goes in stages: it
    trains until the mark's tokens are spent (the first step that reaches them), exports, is evaluated,
    and resumes from its checkpoint with the next mark's budget, which continues it exactly as if it had
    not stopped (tests/trainer_test.py). Each stage and evaluation is skipped when its output exists (a
    finished run is not repeated, an interrupted one resumes); a mark that a run had already passed when
    it was started with these marks (a run of an older version) is left out of its curve."""
    from attnrl_jax import trainer
    from attnrl_jax.task import pipeline
    from attnrl_jax.task.report import read_metrics

    preset, off_policy, overrides = ALL[method]
    work = _run_dir(args.workdir, method, seed)
    rl = pipeline.rl_config(c, paths, workdir=work)
    rl.seed = seed
    rl.algo.preset = preset
    rl.train.off_policy = off_policy
    rl.train.steps = args.max_steps
    for key, value in overrides.items():
        section, field = key.split(".")
        rl[section][field] = value
    if args.lr is not None:
        rl.optim.lr = args.lr
    # Each mark resumes the run with a larger token budget: the one change it makes on purpose.
    rl.accept_changes = "train.max_generated_tokens"
    rl.heldout.every = 0  # its held-out curve comes from the marks' evaluations
    metrics = os.path.join(work, "metrics.jsonl")
    for fraction in [*sorted(args.heldout_marks), 1.0]:
        out = _mark_eval(args.workdir, method, seed, fraction)
        if os.path.isfile(out + ".json"):
            continue
        tokens = round(fraction * args.budget)
        records = read_metrics(metrics) if os.path.isfile(metrics) else []
        if len(records) > 1 and records[-2]["total_generated_tokens"] >= tokens and fraction < 1.0:
            continue  # this run went past the mark before it was asked for: no policy at the mark
        rl.train.max_generated_tokens = tokens
        print(f"== {method}_seed{seed} to {tokens:,} tokens", flush=True)
        trainer.run(rl)  # resumes; takes no step when the mark's tokens are already spent
        pipeline.evaluate_checkpoint(c, trainer.latest_export(work), paths["eval_data"], out)


def _record(workdir: str, method: str, seed: int, before: float, marks=()) -> dict:
    from attnrl_jax.task.report import read_metrics

    with open(_final_eval(workdir, method, seed) + ".json") as f:
        after = json.load(f)["mean"]["avg@k"]
    records = read_metrics(os.path.join(_run_dir(workdir, method, seed), "metrics.jsonl"))
    # Held-out accuracy against tokens and wall-clock: the warm start, each mark's policy, the final one.
    curve = [{"fraction": 0.0, "step": 0, "tokens": 0, "time_s": 0.0, "accuracy": before}]
    for fraction in [*sorted(marks), 1.0]:
        path = _mark_eval(workdir, method, seed, fraction) + ".json"
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            result = json.load(f)
        step = int(os.path.basename(result["checkpoint"])[len("step_") :])  # the export evaluated
        curve.append(
            {
                "fraction": fraction,
                "step": step,
                "tokens": records[step - 1]["total_generated_tokens"],
                "time_s": records[step - 1]["total_time_s"],
                "accuracy": result["mean"]["avg@k"],
            }
        )
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
        "heldout_curve": curve,
        # What the budget bought: training paths, continuations and their tokens, optimizer steps.
        "paths": sum(r["num_paths"] for r in records),
        "continuations": sum(r.get("num_continuations", 0) for r in records),
        "continuation_tokens": sum(r.get("continuation_tokens", 0) for r in records),
        "optimizer_steps": sum(r.get("update/optimizer_steps", 0) for r in records),
    }


def _mean_curve(runs, fractions) -> list[dict]:
    """Per fraction of the budget: held-out accuracy (points) with its 95% interval, tokens and minutes,
    averaged over the runs that have a policy at that mark."""
    out = []
    for fraction in fractions:
        points = [p for r in runs for p in r["heldout_curve"] if p["fraction"] == fraction]
        mean, half = interval([100 * p["accuracy"] for p in points])
        out.append(
            {
                "fraction": fraction,
                "seeds": len(points),
                "accuracy": mean,
                "ci95": [mean - half, mean + half],
                "tokens": float(np.mean([p["tokens"] for p in points])) if points else float("nan"),
                "minutes": float(np.mean([p["time_s"] for p in points])) / 60 if points else float("nan"),
            }
        )
    return out


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
    base += ["--heldout-marks", *map(str, args.heldout_marks)] + (["--toy"] if args.toy else [])
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
    """Top: held-out accuracy of each run's policy at the budget's marks (thin: seeds; thick: the mean
    over seeds at each mark); bottom: training accuracy step by step. Against tokens and wall-clock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex="col")
    for i, method in enumerate(methods):
        rs = [x for x in runs if x["method"] == method]
        for j, r in enumerate(rs):
            curve = r["heldout_curve"]
            acc = [100 * p["accuracy"] for p in curve]
            for ax, key, scale in ((axes[0, 0], "tokens", 1e3), (axes[0, 1], "time_s", 60)):
                ax.plot([p[key] / scale for p in curve], acc, "-", color=f"C{i}", alpha=0.25, lw=0.8)
            # A mean of up to 5 steps, at most a third of the run (a 5-step run is drawn step by step).
            w = max(1, min(5, len(r["curve_accuracy"]) // 3))
            train = np.convolve(r["curve_accuracy"], np.ones(w) / w, mode="valid")
            for ax, key, scale in ((axes[1, 0], "curve_tokens", 1e3), (axes[1, 1], "curve_time", 60)):
                x = np.array(r[key][w - 1 :], float) / scale
                ax.plot(x, 100 * train, ".-", color=f"C{i}", alpha=0.6, label=method if j == 0 else None)
        fractions = sorted({p["fraction"] for r in rs for p in r["heldout_curve"]})
        mean = _mean_curve(rs, fractions)
        for ax, key, scale in ((axes[0, 0], "tokens", 1e3), (axes[0, 1], "minutes", 1)):
            ax.plot(
                [p[key] / scale for p in mean],
                [p["accuracy"] for p in mean],
                "o-",
                color=f"C{i}",
                lw=2,
                label=f"{method} (mean of {len(rs)})",
            )
    for col, label in enumerate(("generated tokens (thousands)", "wall-clock (minutes)")):
        axes[1, col].set_xlabel(label)
    for ax in axes[0]:
        ax.set_ylabel("held-out avg@k (%)")
    for ax in axes[1]:
        ax.set_ylabel("training accuracy (%, running mean)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
