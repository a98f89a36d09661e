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
commit it). Runs resume: a finished run is not repeated.
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
    parser.add_argument("--budget", type=int, default=800_000, help="generated tokens per run")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate for every method (default: the config's)"
    )
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from attnrl_jax import trainer
    from attnrl_jax.report import read_metrics
    from attnrl_jax.task import pipeline
    from configs import program as program_config
    from configs import task as task_config

    args.workdir = args.workdir or ("runs/compare" if args.task == "arith" else "runs/compare_program")
    c = (task_config if args.task == "arith" else program_config).get_config()
    c.workdir = os.path.join(args.workdir, "shared")
    paths = pipeline.prepare(c)
    with open(paths["warm_eval"] + ".json") as f:
        before = json.load(f)["mean"]["avg@k"]

    runs = []
    for method in args.methods:
        preset, off_policy, overrides = ALL[method]
        for seed in args.seeds if method in METHODS else args.ablation_seeds:
            name = f"{method}_seed{seed}"
            work = os.path.join(args.workdir, name)
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
                print(f"== {name}", flush=True)
                trainer.run(rl)
            out = os.path.join(work, "eval", "final")
            if not os.path.isfile(out + ".json"):
                pipeline.evaluate_checkpoint(c, trainer.latest_export(work), paths["eval_data"], out)
            with open(out + ".json") as f:
                after = json.load(f)["mean"]["avg@k"]
            records = read_metrics(os.path.join(work, "metrics.jsonl"))
            runs.append(
                {
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
                }
            )

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
                    limit = frac * (total or x[-1])
                    upto = [a for a, t in zip(r["curve_accuracy"], x) if t <= limit][-5:]
                    vals.append(np.mean(upto) if upto else np.nan)
                cells.append(f"{100 * np.nanmean(vals):.1f}")
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
    print(f"\nwrote {args.workdir}/comparison.json, comparison.png and {output}")


def _plot(runs, methods, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, method in enumerate(methods):
        for j, r in enumerate(x for x in runs if x["method"] == method):
            acc = np.convolve(r["curve_accuracy"], np.ones(5) / 5, mode="valid")
            for ax, key, scale in ((axes[0], "curve_tokens", 1e3), (axes[1], "curve_time", 60)):
                x = np.array(r[key][4:], float) / scale
                ax.plot(x, acc, color=f"C{i}", alpha=0.7, label=method if j == 0 else None)
    axes[0].set_xlabel("generated tokens (thousands)")
    axes[1].set_xlabel("wall-clock (minutes)")
    for ax in axes:
        ax.set_ylabel("training accuracy (5-step mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
