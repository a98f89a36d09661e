"""AttnRL against GRPO, TreeRL-style entropy branching and random branching on a built-in task, at an equal
budget over several seeds, with the runs that isolate why one method beats another:
`python -m benchmarks.task_comparison --task program --workers 2`.

One shared preparation (data, tokenizer, warm start and its evaluation; configs/task.py for `--task arith`,
configs/program.py for `--task program`), then for each method and seed an RL run from the same warm start
that stops at its budget, and the held-out evaluation of its policy at `--heldout-marks` fractions of the
budget (default 50%: the run stops at the mark, is evaluated and resumes exactly) and at the end.

* The main methods (attnrl, grpo, treerl, random_branching) run `--seeds` (0-4) to `--budget` generated
  tokens (480,000 on the program task).
* The isolating runs run `--ablation-seeds` (0-2), each changing one factor: AttnRL on-policy (two sampler
  rounds, as TreeRL); TreeRL one-step off-policy (AttnRL's pipeline); AttnRL with every response branched
  (no difficulty-aware expansion) and without the FCI filter; ATB's branch steps with every response
  branched (TreeRL's tree with AttnRL's criterion) at `--paths-budget` training paths, TreeRL's paths at the
  token budget, so the branching criteria compare at equal paths; AttnRL at `--steps-budget` optimizer
  steps, TreeRL's (the paper's axis).
* `--methods` also takes further Table 2 rows (atb_all_branched at equal tokens, attnrl_fixed_batch).

Prints, per run, the held-out accuracy (avg@k) before and after with the steps, optimizer steps, paths,
tokens and minutes used; per method, the mean gain with a 95% interval (Student's t over seeds); what the
budget bought; the update's readings (|dtheta|/|theta|, gradient norm, KL, clip fraction, ratio); seconds per
step and per generated token (one core each: the paper's Table 3 efficiency, one-step off-policy against two
rounds); held-out accuracy at each mark with its tokens, optimizer steps and minutes; and training accuracy
at fractions of the tokens and of the wall-clock. Writes <workdir>/comparison.json and comparison.png
(held-out and training accuracy against generated tokens, optimizer steps and wall-clock) and the
machine-readable `--output` (benchmarks/results/task_comparison.json: small, commit it) with the curves
beside it (.png). Runs resume: a finished run is not repeated. `--workers 2` runs two at a time, each
pinned to one core; every run shares one persistent XLA compilation cache (<workdir>/xla_cache). A run's
wall-clock is the sum of its steps' times (evaluations excluded); a resumed stage's first step loads its
programs from the cache. `--set KEY=VALUE` and `--lr` change every run (e.g. loss.objective=reinforce).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import numpy as np

# name: (algo preset, one-step off-policy, other config overrides, budget unit)
METHODS = {
    "attnrl": ("attnrl", True, {}, "tokens"),
    "grpo": ("grpo", False, {}, "tokens"),
    "treerl": ("treerl", False, {}, "tokens"),
    "random_branching": ("random_branching", False, {}, "tokens"),
}
ISOLATING = {  # each changes one factor between AttnRL and TreeRL, from the same warm start
    "attnrl_on_policy": ("attnrl", False, {}, "tokens"),  # AttnRL's pipeline: two sampler rounds, as TreeRL
    "treerl_off_policy": ("treerl", True, {}, "tokens"),  # TreeRL with AttnRL's one-step off-policy pipeline
    # every response branched (no difficulty-aware expansion), and no FCI filter
    "attnrl_no_difficulty_expansion": ("attnrl_no_difficulty_expansion", True, {}, "tokens"),
    "attnrl_no_attention_filter": ("attnrl_no_attention_filter", True, {}, "tokens"),
    # the branching criterion alone (TreeRL with ATB's branch steps) at TreeRL's paths rather than tokens
    "atb_all_branched_equal_paths": ("treerl_atb", False, {}, "paths"),
    # the paper's axis: AttnRL at TreeRL's optimizer steps
    "attnrl_equal_optimizer_steps": ("attnrl", True, {}, "optimizer_steps"),
}
ABLATIONS = {  # further rows of the paper's Table 2 (by name; not in the default set)
    "atb_all_branched": ("treerl_atb", False, {}, "tokens"),  # ATB vs random_branching at equal tokens
    "attnrl_fixed_batch": ("attnrl", True, {"algo.adaptive_batch": False}, "tokens"),
}
# budget unit: (config.train key that stops the run, the metrics record's running total)
UNITS = {
    "tokens": ("max_generated_tokens", "total_generated_tokens"),
    "paths": ("max_paths", "total_paths"),
    "optimizer_steps": ("max_optimizer_steps", "total_optimizer_steps"),
}
ALL = {**METHODS, **ISOLATING, **ABLATIONS}
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="the main methods'")
    parser.add_argument(
        "--ablation-seeds", type=int, nargs="*", default=[0, 1, 2], help="the isolating and ablation rows'"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[*METHODS, *ISOLATING],
        choices=list(ALL),
        help="default: the main methods and the isolating runs",
    )
    parser.add_argument(
        "--output", default=None, help="default: benchmarks/results/task_comparison[_arith].json"
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help="generated tokens per run (default: 800,000 for arith; 480,000 for program, where GRPO's gain "
        "over 3 seeds excluded zero and at 160,000 no method moved held-out accuracy: benchmarks/RESULTS.md)",
    )
    parser.add_argument(
        "--paths-budget",
        type=int,
        default=7_200,
        help="training paths per run for the rows budgeted in paths (default: TreeRL's and random "
        "branching's at 480k tokens on the program task: 15 steps of 480 paths, 16 prompts x 6 x (1 + 4))",
    )
    parser.add_argument(
        "--steps-budget",
        type=int,
        default=120,
        help="optimizer steps per run for the rows budgeted in optimizer steps (default: TreeRL's at 480k "
        "tokens on the program task: 15 steps of 8 mini-batches of at most 64 rows)",
    )
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument(
        "--heldout-marks",
        type=float,
        nargs="*",
        default=[0.5],
        help="fractions of each run's budget at which its policy is also evaluated on the held-out set "
        "(the curves; about half a minute of one core each); none: only before and after",
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate for every method (default: the config's)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run (repeatable; typed like the value it replaces), e.g. "
        "loss.objective=reinforce",
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
        "harness in minutes; give --workdir, --output, a --budget of a few thousand tokens and small "
        "--paths-budget and --steps-budget)",
    )
    parser.add_argument("--run", default=None, metavar="METHOD:SEED", help=argparse.SUPPRESS)
    args = parser.parse_args()
    bad = [f for f in args.heldout_marks if not 0 < f < 1]
    if bad:
        parser.error(
            f"--heldout-marks {bad}: each mark is a fraction of the budget, strictly between 0 and 1"
        )
    for flag in ("budget", "paths_budget", "steps_budget"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a positive number")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args.workdir = args.workdir or ("runs/compare" if args.task == "arith" else "runs/compare_program")
    args.budget = args.budget or (800_000 if args.task == "arith" else 480_000)
    # One persistent XLA compilation cache for every run of the comparison (set before jax is imported; the
    # workers inherit it): the runs compile the same sampler and update shapes again and again (the adaptive
    # batch changes them from step to step), which without it took about half of a short run's minutes.
    cache = os.path.abspath(os.path.join(args.workdir, "xla_cache"))
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

    from attnrl_jax.task import pipeline
    from configs import program as program_config
    from configs import task as task_config

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
    summary = _summarise(runs, args)
    _print_tables(runs, summary, args, before, c.task.eval_k)

    os.makedirs(args.workdir, exist_ok=True)
    budgets = {"tokens": args.budget, "paths": args.paths_budget, "optimizer_steps": args.steps_budget}
    with open(os.path.join(args.workdir, "comparison.json"), "w") as f:
        json.dump({"before": before, "runs": runs, "summary": summary, "budgets": budgets}, f, indent=1)
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
        "budgets": budgets,
        "commit": commit,
        "warm_start_heldout": 100 * before,
        "eval_k": c.task.eval_k,
        "overrides": args.set + ([f"optim.lr={args.lr}"] if args.lr is not None else []),
        "methods": summary,
    }
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(output + ".tmp", output)
    figure = os.path.splitext(output)[0] + ".png"  # the curves beside the JSON (about 200 kB)
    _plot(runs, args.methods, figure)
    print(f"\nwrote {args.workdir}/comparison.json, comparison.png, {output} and {figure}")


def _budget(args, unit: str) -> int:
    return {"tokens": args.budget, "paths": args.paths_budget, "optimizer_steps": args.steps_budget}[unit]


def _summarise(runs: list[dict], args) -> dict:
    """Per method: the per-seed gains with their mean and 95% interval (the schema of the JSON's
    "methods"), what the budget bought, the update's diagnostics and the time per step and per token."""
    summary = {}
    for method in args.methods:
        rs = [r for r in runs if r["method"] == method]
        gains = np.array([r["gain"] for r in rs])
        mean, half = interval(gains)
        preset, off_policy, overrides, unit = ALL[method]
        summary[method] = {
            "gains": [100 * float(g) for g in gains],  # per seed, held-out points
            "seeds": [r["seed"] for r in rs],
            "mean_gain": 100 * mean,
            "ci95": [100 * (mean - half), 100 * (mean + half)],
            "std": 100 * float(gains.std(ddof=1)) if len(gains) > 1 else float("nan"),
            "after": [100 * r["after"] for r in rs],
            "tokens": [r["tokens"] for r in rs],
            "minutes": [r["minutes"] for r in rs],
            "paths": [r["paths"] for r in rs],
            "optimizer_steps": [r["optimizer_steps"] for r in rs],
            "preset": preset,
            "off_policy": off_policy,
            "overrides": overrides,
            "budget_unit": unit,
            "budget": _budget(args, unit),
            "update": {k: float(np.mean([r["update"][k] for r in rs])) for k in rs[0]["update"]},
            "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in rs])),
            "seconds_per_1k_tokens": float(np.mean([r["seconds_per_1k_tokens"] for r in rs])),
            "sample_seconds_per_1k_tokens": float(np.mean([r["sample_seconds_per_1k_tokens"] for r in rs])),
        }
    return summary


def _print_tables(runs, summary, args, before, k) -> None:
    print(f"\nheld-out avg@{k} of the warm start: {100 * before:.1f}%\n")
    print(
        "| method | seed | budget | steps | optimizer steps | paths | tokens | minutes | after (%) | gain |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        unit = ALL[r["method"]][3]
        print(
            f"| {r['method']} | {r['seed']} | {_budget(args, unit):,} {unit} | {r['steps']} | "
            f"{r['optimizer_steps']:.0f} | {r['paths']:,} | {r['tokens']:,} | {r['minutes']:.1f} | "
            f"{100 * r['after']:.1f} | {100 * r['gain']:+.1f} |"
        )
    print("\n| method | budget | seeds | mean gain (points) | 95% interval | std | tokens | minutes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for method, m in summary.items():
        lo, hi = m["ci95"]
        print(
            f"| {method} | {m['budget']:,} {m['budget_unit']} | {len(m['seeds'])} | {m['mean_gain']:+.1f} | "
            f"[{lo:+.1f}, {hi:+.1f}] | {m['std']:.1f} | {np.mean(m['tokens']):,.0f} | "
            f"{np.mean(m['minutes']):.1f} |"
        )
    print("\nWhat the budget bought (mean per run):")
    print("| method | tokens | training paths | continuations | tokens per continuation | optimizer steps |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in args.methods:
        rs = [r for r in runs if r["method"] == method]
        cont = np.mean([r["continuations"] for r in rs])
        tokens = np.sum([r["continuation_tokens"] for r in rs])
        per = tokens / max(np.sum([r["continuations"] for r in rs]), 1)
        tok, paths = np.mean([r["tokens"] for r in rs]), np.mean([r["paths"] for r in rs])
        print(
            f"| {method} | {tok:,.0f} | {paths:,.0f} | {cont:,.0f} | {per:.1f} | "
            f"{np.mean([r['optimizer_steps'] for r in rs]):.1f} |"
        )
    print(
        "\nThe update (mean over seeds of each run's mean over its optimizer steps; step size: |dtheta| / "
        "|theta|, relative to the parameters; KL: k3 to the warm start, the run's last quarter):"
    )
    print("| method | lr | step size | grad norm | KL (last quarter) | clip fraction | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, m in summary.items():
        u = m["update"]
        print(
            f"| {method} | {u['lr']:g} | {u['relative_update']:.2e} | {u['grad_norm']:.3f} | "
            f"{u['kl_last_quarter']:.4f} | {u['clip_frac']:.4f} | {u['ratio']:.4f} |"
        )
    print(
        "\nTime (one core each, the comparison's persistent compilation cache; mean over seeds of each run's "
        "steps after its first, which compiles):"
    )
    print("| method | pipeline | s per step | s per 1k generated tokens | of which sampling |")
    print("|---|---|---:|---:|---:|")
    for method, m in summary.items():
        pipe = "one-step off-policy" if m["off_policy"] else "on-policy (two rounds)"
        if m["preset"] == "grpo":
            pipe = "on-policy (one round)"
        print(
            f"| {method} | {pipe} | {m['seconds_per_step']:.1f} | {m['seconds_per_1k_tokens']:.2f} | "
            f"{m['sample_seconds_per_1k_tokens']:.2f} |"
        )
    print(
        f"\nHeld-out avg@{k} (%) at fractions of each run's budget, mean over seeds (the policy exported at "
        "the first step that reached the mark; its mean tokens, optimizer steps and minutes in brackets):"
    )
    fractions = [0.0, *sorted(args.heldout_marks), 1.0]
    print("| method | " + " | ".join(f"{round(100 * f)}%" for f in fractions) + " |")
    print("|---|" + "---:|" * len(fractions))
    for method in args.methods:
        curve = _mean_curve([r for r in runs if r["method"] == method], fractions)
        summary[method]["heldout_curve"] = curve
        cells = [
            f"{p['accuracy']:.1f} ({p['tokens'] / 1e3:.0f}k, {p['optimizer_steps']:.0f}, "
            f"{p['minutes']:.1f} min)"
            if p["seeds"]
            else "-"
            for p in curve
        ]
        print(f"| {method} | " + " | ".join(cells) + " |")
    print("\nTraining accuracy (initial responses, mean over seeds and the last 5 steps before the mark):")
    print("| method | 25% tokens | 50% | 75% | 100% | 25% wall-clock | 50% | 75% | 100% |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method in args.methods:
        rs = [r for r in runs if r["method"] == method]
        cells = []
        for key in ("curve_tokens", "curve_time"):
            for frac in (0.25, 0.5, 0.75, 1.0):
                vals = []
                for r in rs:
                    x = np.array(r[key], float)
                    upto = [a for a, t in zip(r["curve_accuracy"], x) if t <= frac * x[-1]][-5:]
                    vals.append(np.mean(upto) if upto else np.nan)
                vals = [v for v in vals if not np.isnan(v)]  # "-": no step of any seed before the mark
                cells.append(f"{100 * np.mean(vals):.1f}" if vals else "-")
        print(f"| {method} | " + " | ".join(cells) + " |")


def _run_dir(workdir: str, method: str, seed: int) -> str:
    return os.path.join(workdir, f"{method}_seed{seed}")


def _final_eval(workdir: str, method: str, seed: int) -> str:
    return os.path.join(_run_dir(workdir, method, seed), "eval", "final")


def _mark_eval(workdir: str, method: str, seed: int, fraction: float) -> str:
    if fraction >= 1.0:
        return _final_eval(workdir, method, seed)
    return os.path.join(_run_dir(workdir, method, seed), "eval", f"at_{round(100 * fraction)}pct")


def _train_and_evaluate(args, c, paths, method: str, seed: int) -> None:
    """One RL run from the shared warm start, stopped at its budget (tokens, paths or optimizer steps), with
    the held-out evaluation of its policy at each `--heldout-marks` fraction of the budget and at the end.
    The run goes in stages: it trains until the mark is reached (the first step that reaches it), exports,
    is evaluated, and resumes from its checkpoint with the next mark's budget, which continues it exactly
    as if it had not stopped (tests/trainer_test.py). Each stage and evaluation is skipped when its output
    exists (a finished run is not repeated, an interrupted one resumes); a mark that a run had already
    passed when it was started with these marks (a run of an older version) is left out of its curve."""
    from attnrl_jax import trainer
    from attnrl_jax.cli import apply_sets
    from attnrl_jax.task import pipeline
    from attnrl_jax.task.report import read_metrics

    preset, off_policy, overrides, unit = ALL[method]
    key, total = UNITS[unit]
    work = _run_dir(args.workdir, method, seed)
    rl = pipeline.rl_config(c, paths, workdir=work)
    rl.seed = seed
    rl.algo.preset = preset
    rl.train.off_policy = off_policy
    rl.train.steps = args.max_steps
    for name, value in overrides.items():
        section, field = name.split(".")
        rl[section][field] = value
    if args.lr is not None:
        rl.optim.lr = args.lr
    apply_sets(rl, args.set)
    # Each mark resumes the run with a larger budget: the one change it makes on purpose.
    rl.accept_changes = f"train.{key}"
    rl.heldout.every = 0  # its held-out curve comes from the marks' evaluations
    metrics = os.path.join(work, "metrics.jsonl")
    for fraction in [*sorted(args.heldout_marks), 1.0]:
        out = _mark_eval(args.workdir, method, seed, fraction)
        if os.path.isfile(out + ".json"):
            continue
        amount = max(1, round(fraction * _budget(args, unit)))
        records = read_metrics(metrics) if os.path.isfile(metrics) else []
        if len(records) > 1 and _totals(records)[-2][total] >= amount and fraction < 1.0:
            continue  # this run went past the mark before it was asked for: no policy at the mark
        rl.train[key] = amount
        print(f"== {method}_seed{seed} to {amount:,} {unit}", flush=True)
        trainer.run(rl)  # resumes; takes no step when the mark is already reached
        pipeline.evaluate_checkpoint(c, trainer.latest_export(work), paths["eval_data"], out)


def _totals(records: list[dict]) -> list[dict]:
    """Each step's running totals of tokens, paths and optimizer steps (counted from the per-step records
    where a run's records predate the totals of paths and optimizer steps)."""
    out, paths, steps = [], 0, 0
    for r in records:
        paths += r["num_paths"]
        steps += r.get("update/optimizer_steps", 0)
        out.append(
            {
                "total_generated_tokens": r["total_generated_tokens"],
                "total_paths": r.get("total_paths", paths),
                "total_optimizer_steps": r.get("total_optimizer_steps", steps),
            }
        )
    return out


def _record(workdir: str, method: str, seed: int, before: float, marks=()) -> dict:
    from attnrl_jax.task.report import read_metrics

    with open(_final_eval(workdir, method, seed) + ".json") as f:
        after = json.load(f)["mean"]["avg@k"]
    records = read_metrics(os.path.join(_run_dir(workdir, method, seed), "metrics.jsonl"))
    totals = _totals(records)
    # Held-out accuracy against tokens, optimizer steps and wall-clock: the warm start, each mark's policy,
    # the final one.
    curve = [
        {"fraction": 0.0, "step": 0, "tokens": 0, "optimizer_steps": 0, "time_s": 0.0, "accuracy": before}
    ]
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
                "tokens": totals[step - 1]["total_generated_tokens"],
                "optimizer_steps": totals[step - 1]["total_optimizer_steps"],
                "time_s": records[step - 1]["total_time_s"],
                "accuracy": result["mean"]["avg@k"],
            }
        )
    later = records[1:] or records  # the first step compiles (with a cold cache) and is not a steady step
    last_quarter = records[len(records) * 3 // 4 :]

    def mean(key, rs=records):
        values = [r[key] for r in rs if key in r]
        return float(np.mean(values)) if values else float("nan")

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
        "curve_optimizer_steps": [t["total_optimizer_steps"] for t in totals],
        "curve_time": [r["total_time_s"] for r in records],
        "curve_accuracy": [r["accuracy"] for r in records],
        "heldout_curve": curve,
        # What the budget bought: training paths, continuations and their tokens, optimizer steps.
        "paths": int(totals[-1]["total_paths"]),
        "continuations": sum(r.get("num_continuations", 0) for r in records),
        "continuation_tokens": sum(r.get("continuation_tokens", 0) for r in records),
        "optimizer_steps": float(totals[-1]["total_optimizer_steps"]),
        # The update, step by step means (issue 37's fragility readings).
        "update": {
            "lr": _run_lr(workdir, method, seed),
            "relative_update": mean("update/relative_update"),
            "grad_norm": mean("update/grad_norm"),
            "kl_last_quarter": mean("update/kl", last_quarter),
            "clip_frac": mean("update/clip_frac"),
            "ratio": mean("update/ratio"),
        },
        # Time: steady steps only (efficiency; the paper's Table 3 compares these).
        "seconds_per_step": float(np.mean([r["time_step"] for r in later])),
        "seconds_per_1k_tokens": 1e3
        * sum(r["time_step"] for r in later)
        / max(sum(r["generated_tokens"] for r in later), 1),
        "sample_seconds_per_1k_tokens": 1e3
        * sum(r["time_sample"] for r in later)
        / max(sum(r["generated_tokens"] for r in later), 1),
    }


def _run_lr(workdir: str, method: str, seed: int) -> float:
    """The learning rate the run trained at (its checkpoint's recorded config)."""
    from attnrl_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(os.path.join(_run_dir(workdir, method, seed), "ckpt"))
    try:
        return float(ckpt.meta()["config"]["optim"]["lr"])
    finally:
        ckpt.close()


def _mean_curve(runs, fractions) -> list[dict]:
    """Per fraction of the budget: held-out accuracy (points) with its 95% interval, tokens, optimizer steps
    and minutes, averaged over the runs that have a policy at that mark."""
    out = []
    for fraction in fractions:
        points = [p for r in runs for p in r["heldout_curve"] if p["fraction"] == fraction]
        mean, half = interval([100 * p["accuracy"] for p in points])

        def avg(key, points=points):
            return float(np.mean([p.get(key, np.nan) for p in points])) if points else float("nan")

        out.append(
            {
                "fraction": fraction,
                "seeds": len(points),
                "accuracy": mean,
                "ci95": [mean - half, mean + half],
                "tokens": avg("tokens"),
                "optimizer_steps": avg("optimizer_steps"),
                "minutes": avg("time_s") / 60,
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
    base += ["--paths-budget", str(args.paths_budget), "--steps-budget", str(args.steps_budget)]
    if args.lr is not None:
        base += ["--lr", str(args.lr)]
    base += [f"--set={item}" for item in args.set]
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
    over seeds at each mark); bottom: training accuracy step by step. Against generated tokens, optimizer
    steps and wall-clock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_x = (("tokens", "curve_tokens", 1e3), ("optimizer_steps", "curve_optimizer_steps", 1))
    axes_x += (("time_s", "curve_time", 60),)
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), sharex="col")
    for i, method in enumerate(methods):
        color = f"C{i % 10}"
        style = "-" if i < 10 else "--"
        rs = [x for x in runs if x["method"] == method]
        for j, r in enumerate(rs):
            curve = r["heldout_curve"]
            acc = [100 * p["accuracy"] for p in curve]
            for col, (key, train_key, scale) in enumerate(axes_x):
                xs = [p.get(key, np.nan) / scale for p in curve]
                axes[0, col].plot(xs, acc, style, color=color, alpha=0.2, lw=0.8)
                # A mean of up to 5 steps, at most a third of the run (a 5-step run is drawn step by step).
                w = max(1, min(5, len(r["curve_accuracy"]) // 3))
                train = np.convolve(r["curve_accuracy"], np.ones(w) / w, mode="valid")
                x = np.array(r[train_key][w - 1 :], float) / scale
                axes[1, col].plot(
                    x,
                    100 * train,
                    style,
                    color=color,
                    alpha=0.5,
                    label=method if j == 0 and col == 0 else None,
                )
        fractions = sorted({p["fraction"] for r in rs for p in r["heldout_curve"]})
        mean = _mean_curve(rs, fractions)
        for col, (key, scale) in enumerate((("tokens", 1e3), ("optimizer_steps", 1), ("minutes", 1))):
            axes[0, col].plot(
                [p[key] / scale for p in mean],
                [p["accuracy"] for p in mean],
                "o" + style,
                color=color,
                lw=2,
                label=f"{method} ({len(rs)})" if col == 0 else None,
            )
    labels = ("generated tokens (thousands)", "optimizer steps", "wall-clock (minutes, one core)")
    for col, label in enumerate(labels):
        axes[1, col].set_xlabel(label)
    axes[0, 0].set_ylabel("held-out avg@k (%)")
    axes[1, 0].set_ylabel("training accuracy (%, running mean)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
