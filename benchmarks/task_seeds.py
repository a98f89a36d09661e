"""The built-in task (`make run`) over task seeds: `python -m benchmarks.task_seeds [--seeds 0 1 2 3 4]
[--config configs/program.py] [--workers 2] [-- --config.x=y ...]`.

Each seed is the README's command, `python train.py --config=<config> --config.task.seed=S` (default
configs/task.py; configs/program.py for the pivotal-step family), in its own process and workdir
(`<workdir>/seed<S>`, default runs/task_seeds or runs/program_seeds; a seed whose job has finished, i.e.
whose summary.json exists, is not run again, and an interrupted one resumes). `--workers 2` runs two seeds
at once, each pinned to one core with single-threaded XLA. Each job's output goes to
<workdir>/seed<S>/job.log (and, one job at a time, to the terminal too). A seed whose job fails (a warm
start that misses its target, say) is a result: its exit and error go to <workdir>/seed<S>/failed.json,
it is named under the table and not run again (`--retry-failed` runs it again), and the command exits 1.
Prints per seed the held-out avg@k after the
warm start and after AttnRL, the gain, pass@k and the job's minutes (its stages' time, summed over
resumed invocations), then the median and range of each over the seeds, and writes
<workdir>/task_seeds.json. The runs vary with the seed (data, initialisation, sampling): one run says
little, the spread over seeds is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default="configs/task.py", choices=["configs/task.py", "configs/program.py"]
    )
    parser.add_argument("--workdir", default=None, help="default: runs/task_seeds, runs/program_seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--workers", type=int, default=1, help="seeds at once, each on one core (default 1, every core)"
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="run again the seeds whose job failed (default: report them from <workdir>/seed<S>/failed.json)",
    )
    parser.add_argument("overrides", nargs="*", help="extra --config.x=y flags for every run")
    args = parser.parse_args()
    if args.workdir is None:
        args.workdir = "runs/task_seeds" if args.config == "configs/task.py" else "runs/program_seeds"

    def command(seed: int) -> tuple[str, list[str]]:
        work = os.path.abspath(os.path.join(args.workdir, f"seed{seed}"))
        cmd = [sys.executable, "train.py", f"--config={args.config}", f"--config.task.seed={seed}"]
        return work, cmd + [f"--config.workdir={work}", *args.overrides]

    def failure_path(seed: int) -> str:
        return os.path.join(command(seed)[0], "failed.json")

    if args.retry_failed:
        for s in args.seeds:
            if os.path.isfile(failure_path(s)):
                os.remove(failure_path(s))
    pending = [
        s
        for s in args.seeds
        if not os.path.isfile(os.path.join(command(s)[0], "summary.json"))
        and not os.path.isfile(failure_path(s))
    ]
    codes = {}
    if args.workers > 1 and pending:
        from benchmarks.workers import run_pinned

        jobs = [(str(s), command(s)[1], os.path.join(command(s)[0], "job.log")) for s in pending]
        codes = {int(name): code for name, code in run_pinned(jobs, args.workers, ROOT, True).items()}
    elif pending:
        for seed in pending:
            work, cmd = command(seed)
            print(f"== seed {seed}: {' '.join(cmd[1:])}", flush=True)
            os.makedirs(work, exist_ok=True)
            with open(os.path.join(work, "job.log"), "a") as log:  # the terminal and the log both
                proc = subprocess.Popen(
                    cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
                for line in proc.stdout:
                    sys.stdout.write(line)
                    log.write(line)
                if proc.wait() != 0:
                    codes[seed] = proc.returncode
    for seed, code in codes.items():
        work = command(seed)[0]
        with open(os.path.join(work, "job.log")) as f:
            lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error")] or lines[-1:]
        failure = {
            "seed": seed,
            "exit": code,
            "error": errors[-1] if errors else "",
            "log": os.path.join(work, "job.log"),
            "command": " ".join(command(seed)[1][1:]),
        }
        with open(failure_path(seed) + ".tmp", "w") as f:
            json.dump(failure, f, indent=1)
        os.replace(failure_path(seed) + ".tmp", failure_path(seed))

    rows, failures = [], []
    for seed in args.seeds:
        summary_path = os.path.join(command(seed)[0], "summary.json")
        if os.path.isfile(summary_path):
            with open(summary_path) as f:
                rows.append(json.load(f))
        elif os.path.isfile(failure_path(seed)):
            with open(failure_path(seed)) as f:
                failures.append(json.load(f))
        else:
            sys.exit(f"error: seed {seed}: its job neither finished nor failed; see {command(seed)[0]}")
    for f in failures:
        print(f"\nseed {f['seed']} did not finish (exit {f['exit']}): {f['error']} (log: {f['log']})")
    print(f"\n{len(rows)} of {len(args.seeds)} seeds finished")
    if not rows:
        sys.exit(1)
    k = rows[0]["k"]
    print(
        f"\n| seed | warm start: target met at step / steps | avg@{k} after the warm start | after AttnRL "
        f"| gain (points) | pass@{k} before | after | minutes |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        gain = r["accuracy_after"] - r["accuracy_before"]
        warm = r.get("warm_start") or {}
        print(
            f"| {r['seed']} | {warm.get('reached_target_at_step')} / {warm.get('steps')} | "
            f"{100 * r['accuracy_before']:.1f} | {100 * r['accuracy_after']:.1f} | "
            f"{100 * gain:+.1f} | {100 * r['pass_at_k_before']:.1f} | {100 * r['pass_at_k_after']:.1f} | "
            f"{r['minutes']:.1f} |"
        )
    columns = {
        "before": [r["accuracy_before"] for r in rows],
        "after": [r["accuracy_after"] for r in rows],
        "gain": [r["accuracy_after"] - r["accuracy_before"] for r in rows],
    }
    print("\n| over seeds | median | range |")
    print("|---|---:|---:|")
    for name, values in columns.items():
        v = 100 * np.asarray(values)
        print(f"| {name} (points) | {np.median(v):.1f} | {v.min():.1f} to {v.max():.1f} |")
    minutes = np.array([r["minutes"] for r in rows])
    print(f"| minutes | {np.median(minutes):.1f} | {minutes.min():.1f} to {minutes.max():.1f} |")
    print("\nPer level, avg@k before -> after:\n")
    names = list(rows[0]["levels"])
    print("| seed | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for r in rows:
        cells = [f"{100 * r['levels'][n][0]:.1f} -> {100 * r['levels'][n][1]:.1f}" for n in names]
        print(f"| {r['seed']} | " + " | ".join(cells) + " |")
    os.makedirs(args.workdir, exist_ok=True)
    out = os.path.join(args.workdir, "task_seeds.json")
    with open(out, "w") as f:
        json.dump({"runs": rows, "failed": failures}, f, indent=1)
    print(f"\nwrote {out}")
    if failures:
        sys.exit(1)  # the table is of the seeds that finished; the others are named above


if __name__ == "__main__":
    main()
