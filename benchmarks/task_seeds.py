"""The built-in task (`make run`) over task seeds: `python -m benchmarks.task_seeds [--seeds 0 1 2 3 4]
[--config configs/program.py] [--workers 2] [-- --config.x=y ...]`.

Each seed is the README's command, `python train.py --config=<config> --config.task.seed=S` (default
configs/task.py; configs/program.py for the pivotal-step family), in its own process and workdir
(`<workdir>/seed<S>`, default runs/task_seeds or runs/program_seeds; a seed whose job has finished, i.e.
whose summary.json exists, is not run again, and an interrupted one resumes). `--workers 2` runs two seeds
at once, each pinned to one core with single-threaded XLA and its output in <workdir>/seed<S>/job.log.
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
    parser.add_argument("overrides", nargs="*", help="extra --config.x=y flags for every run")
    args = parser.parse_args()
    if args.workdir is None:
        args.workdir = "runs/task_seeds" if args.config == "configs/task.py" else "runs/program_seeds"

    def command(seed: int) -> tuple[str, list[str]]:
        work = os.path.abspath(os.path.join(args.workdir, f"seed{seed}"))
        cmd = [sys.executable, "train.py", f"--config={args.config}", f"--config.task.seed={seed}"]
        return work, cmd + [f"--config.workdir={work}", *args.overrides]

    pending = [s for s in args.seeds if not os.path.isfile(os.path.join(command(s)[0], "summary.json"))]
    if args.workers > 1 and pending:
        from benchmarks.workers import run_pinned

        jobs = [
            (
                f"seed {s}: {' '.join(command(s)[1][1:])}",
                command(s)[1],
                os.path.join(command(s)[0], "job.log"),
            )
            for s in pending
        ]
        run_pinned(jobs, args.workers, cwd=ROOT)

    rows = []
    for seed in args.seeds:
        work, cmd = command(seed)
        summary_path = os.path.join(work, "summary.json")
        if not os.path.isfile(summary_path):
            print(f"== seed {seed}: {' '.join(cmd[1:])}", flush=True)
            done = subprocess.run(cmd, cwd=ROOT)
            if done.returncode != 0 or not os.path.isfile(summary_path):
                sys.exit(
                    f"error: seed {seed} failed (exit {done.returncode}); its log is above, workdir {work}"
                )
        with open(summary_path) as f:
            rows.append(json.load(f))

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
        json.dump({"runs": rows}, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
