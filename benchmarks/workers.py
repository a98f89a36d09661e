"""Runs benchmark jobs N at a time, each pinned to one CPU core with single-threaded XLA.

Shared by `benchmarks.task_comparison` and `benchmarks.task_seeds` (`--workers N`). Each job gets one core,
whichever worker it lands on, so its minutes are one core's and comparable across jobs (two jobs sharing two
cores would slow each other by however much their phases overlap). Hand-written rather than
`concurrent.futures`: a pool cannot pin a child process to the core that just came free.
"""

from __future__ import annotations

import os
import subprocess


def run_pinned(
    jobs: list[tuple[str, list[str], str]], workers: int, cwd: str | None = None, keep_going: bool = False
) -> dict[str, int]:
    """Runs `jobs` (name, argv, log path), `workers` at a time in the given order, each child's output to its
    log (appended). A failed job lets the running ones finish, starts no more and exits with the failed
    jobs' names and logs; with `keep_going` the others still run and the failed jobs' exit codes are
    returned by name (a failure is then a result, e.g. a warm start that missed its target)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        raise SystemExit(f"--workers {workers}: this process may use only {len(cores)} CPU cores")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    queue = list(jobs)
    running, failed, codes = {}, [], {}
    free = cores[:workers]
    while queue or running:
        while queue and free:
            name, argv, log_path = queue.pop(0)
            core = free.pop(0)
            os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
            print(f"== {name} on core {core} (log: {log_path})", flush=True)
            with open(log_path, "a") as log:
                proc = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=lambda core=core: os.sched_setaffinity(0, {core}),
                )
            running[proc.pid] = (core, name, log_path)
        pid, status = os.wait()
        if pid not in running:
            continue
        core, name, log_path = running.pop(pid)
        free.append(core)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            failed.append(f"{name} (see {log_path})")
            codes[name] = code
            print(f"== {name} failed (exit {code}; log: {log_path})", flush=True)
            if not keep_going:
                queue.clear()  # let the running ones finish, start no more
        else:
            print(f"== {name} done", flush=True)
    if failed and not keep_going:
        raise SystemExit("runs failed: " + ", ".join(failed))
    return codes
