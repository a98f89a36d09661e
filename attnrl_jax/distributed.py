"""Multi-process (multi-host) runs with plain `jax.distributed`: every host runs the same command.

Model of a run: all processes execute the same program on the same host-side data. The prompt stream,
the algorithm's per-prompt decisions (sections 6-9) and the checkpoint metadata are computed identically
on every process from identical inputs (same parquet, same seeds, same gathered rewards), so they never
need to be broadcast. Device work is one global SPMD computation over a mesh of every process's devices:
each process places only its own shard of a batch on its devices (`Sharder.put`), device results come
back to every host through `fetch` (an all-gather where an array spans other processes), and the verifier
work is split: each process grades its share of the responses and the verdicts are all-gathered
(`ShardedScorer`). Orbax saves and restores from all processes; logs, reports and exports are written by
process 0.

`initialize(config)` starts `jax.distributed` when the config or the environment asks for it:
  * `distributed.enabled = "auto"` (default): when a coordinator address is given (config or
    `JAX_COORDINATOR_ADDRESS`; process count and id from the config or `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID`), or the environment is a multi-worker TPU slice or a multi-task SLURM job
    (JAX detects the rest itself); otherwise the run stays single-process.
  * `"on"`: always (on TPU pods and SLURM, JAX finds coordinator, process count and id by itself).
  * `"off"`: never.
A process that dies is detected by the coordination service's heartbeat (`distributed.heartbeat_timeout`
seconds); the others then exit non-zero with an error naming it instead of waiting forever in a collective.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import threading
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

from attnrl_jax.rewards.math_grader import Verdict

_watchdog: _Watchdog | None = None


def _wants_distributed(d) -> bool:
    mode = str(d.enabled).lower()
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"config.distributed.enabled={d.enabled!r}; expected auto, on or off")
    if mode != "auto":
        return mode == "on"
    if d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def initialize(c) -> bool:
    """Starts `jax.distributed` as `c.distributed` says (module docstring); returns whether it did.

    Must run before anything touches a JAX backend. Raises ValueError naming a bad field.
    """
    global _watchdog
    d = c.get("distributed") if hasattr(c, "get") else None
    if d is None or not _wants_distributed(d):
        return False
    kwargs = {}
    if d.coordinator_address:
        kwargs["coordinator_address"] = d.coordinator_address
    num_processes = d.num_processes if d.num_processes > 0 else _env_int("JAX_NUM_PROCESSES")
    process_id = d.process_id if d.process_id >= 0 else _env_int("JAX_PROCESS_ID")
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        if num_processes is not None and not 0 <= process_id < num_processes:
            raise ValueError(
                f"config.distributed.process_id={process_id} is outside [0, num_processes={num_processes})"
            )
        kwargs["process_id"] = process_id
    if d.local_device_ids:
        kwargs["local_device_ids"] = [int(x) for x in str(d.local_device_ids).split(",")]
    for key in ("heartbeat_timeout", "initialization_timeout"):
        if d[key] < 1:
            raise ValueError(f"config.distributed.{key} must be at least 1 second, got {d[key]}")
    if d.cpu_collectives:
        # Only used by the CPU backend (tests, laptops); TPU and GPU use their own interconnect.
        jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    jax.distributed.initialize(
        **kwargs,
        initialization_timeout=int(d.initialization_timeout),
        heartbeat_timeout_seconds=int(d.heartbeat_timeout),
    )
    if jax.process_count() > 1:
        _watchdog = _Watchdog(jax.process_count(), max(1.0, d.heartbeat_timeout / 10))
        _watchdog.start()
    return True


def shutdown() -> None:
    """Stops the liveness watchdog (a finished peer is not a dead one) and leaves the distributed run."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None
    if jax.process_count() > 1:
        jax.distributed.shutdown()


def fail(error: BaseException) -> None:
    """In a multi-process run: prints `error` naming this process and exits with status 1 at once. The usual
    shutdown would wait at a barrier for peers that may be dead or stuck in a collective that can no longer
    finish; every save is synchronous, so nothing is left half-written. A no-op in a single-process run."""
    if jax.process_count() == 1:
        return
    first = (str(error).strip().splitlines() or [""])[0][:500]
    print(
        f"error: process {jax.process_index()} of {jax.process_count()}: {type(error).__name__}: {first}\n"
        "(a failed collective usually means that another process died or is unreachable: see its log. "
        "Restart every process with the same command; the run resumes from its latest checkpoint.)",
        file=sys.stderr,
        flush=True,
    )
    os._exit(1)


class _Watchdog(threading.Thread):
    """Polls the coordination service for live processes; when one is gone (it missed its heartbeats),
    prints which one and exits this process with status 1 rather than letting it wait in a collective that
    can never finish. (JAX's own error polling may terminate the process first, with its own message.)"""

    def __init__(self, num_processes: int, period: float):
        super().__init__(name="distributed-watchdog", daemon=True)
        self.num_processes, self.period = num_processes, period
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:

        client = jax_distributed.global_state.client
        everyone = list(range(self.num_processes))
        while not self._stop.wait(self.period):
            try:
                live = client.get_live_nodes(everyone)
            except Exception as e:  # the coordinator (process 0) itself is gone
                if self._stop.is_set():
                    return
                self._die(f"the coordinator (process 0) is unreachable ({str(e).splitlines()[0][:200]})")
            missing = sorted(set(everyone) - set(live) - {jax.process_index()})  # this one is alive
            if missing and not self._stop.is_set():
                self._die(f"process(es) {missing} stopped sending heartbeats")

    def _die(self, what: str) -> None:
        print(
            f"error: process {jax.process_index()} of {self.num_processes}: {what}; a peer died or is "
            "unreachable, so this process exits instead of waiting in a collective. Restart every process "
            "with the same command: the run resumes from its latest checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


def is_main() -> bool:
    """Process 0: the one that writes logs, reports and exports."""
    return jax.process_index() == 0


def fetch(tree):
    """Device arrays -> host numpy arrays holding the global value, on every process (an all-gather where
    an array has shards on other processes' devices). Non-array leaves pass through."""

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any one (a SIGTERM that reached only some hosts):
    the processes then take the same branch around the next collectives."""
    if jax.process_count() == 1:
        return flag

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def share(n: int) -> slice:
    """This process's contiguous share of n items (the first n % P processes take one more)."""
    p, i = jax.process_count(), jax.process_index()
    base, extra = divmod(n, p)
    lo = i * base + min(i, extra)
    return slice(lo, lo + base + (1 if i < extra else 0))


class ShardedScorer:
    """Wraps a verifier's `submit(texts, ground_truths) -> Future[list[Verdict]]` so that each process
    grades only its share of a batch and every process gets all verdicts (all-gathered when `.result()` is
    called, which every process does in the same order, as the training loop is the same program).

    In a single-process run it is the verifier itself.
    """

    def __init__(self, submit: Callable[[Sequence[str], Sequence], concurrent.futures.Future]):
        self._submit = submit

    def __call__(self, texts: Sequence[str], ground_truths: Sequence):
        if jax.process_count() == 1 or not texts:  # (an empty batch is empty everywhere: no gather)
            return self._submit(texts, ground_truths)
        mine = share(len(texts))
        return _Gathered(self._submit(texts[mine], ground_truths[mine]), len(texts))


class _Gathered:
    def __init__(self, local: concurrent.futures.Future, total: int):
        self._local, self._total, self._value = local, total, None

    def result(self):
        if self._value is None:
            local = self._local.result()
            width = -(-self._total // jax.process_count())  # every process sends the same shape
            acc = np.full(width, -1, np.int32)
            score = np.zeros(width, np.float32)
            restarts = np.zeros(width, np.int32)
            acc[: len(local)] = [v.acc for v in local]
            score[: len(local)] = [v.score for v in local]
            restarts[: len(local)] = [getattr(v, "restarts", 0) for v in local]
            # Reasons and answers are strings (logging only): they travel as fixed-width byte arrays.
            text = np.zeros((width, 2, 64), np.uint8)
            for k, v in enumerate(local):
                for j, s in enumerate((v.reason, v.answer or "")):
                    raw = s.encode()[:64]
                    text[k, j, : len(raw)] = np.frombuffer(raw, np.uint8)
            acc, score, restarts, text = multihost_utils.process_allgather((acc, score, restarts, text))
            verdicts = []
            for p in range(jax.process_count()):
                for k in range(width):
                    if acc[p, k] < 0:
                        continue
                    reason, answer = (
                        bytes(text[p, k, j]).rstrip(b"\0").decode(errors="replace") for j in (0, 1)
                    )
                    fields = (int(acc[p, k]), float(score[p, k]), reason, answer or None, int(restarts[p, k]))
                    verdicts.append(Verdict(*fields))
            if len(verdicts) != self._total:
                raise RuntimeError(f"gathered {len(verdicts)} verdicts for {self._total} responses")
            self._value = verdicts
        return self._value
