"""Batch scoring in a pool of worker processes with a per-item time limit enforced from outside.

Math-Verify and sympy cannot be interrupted reliably from inside (Math-Verify's own timeout uses
`signal.alarm`, which refuses threads), and a policy under optimisation can write anything: a tower of
exponents, a megabyte of braces. So every item runs in a worker process; a dispatcher thread hands items to
idle workers and kills (SIGKILL) any worker whose item runs past the limit or whose memory passes its cap,
scores that item 0 with reason "timeout" (or "error"), and starts a replacement. Queue time does not count
against an item's limit.

Workers never outlive the pool: `close()` (also on `with` exit and at interpreter exit) kills them, and on
Linux each worker asks the kernel to kill it when its parent dies, so a crashed trainer leaves none behind.

Usage:
    with VerifierPool(num_workers=2) as pool:
        future = pool.submit(responses, ground_truths)  # returns at once; scoring runs in the background
        ...                                              # device work
        verdicts = future.result()                       # list[Verdict]
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import wait

from attnrl_jax.rewards.math_grader import Verdict, grade

log = logging.getLogger(__name__)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent exits (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def _worker_main(conn, memory_bytes: int) -> None:
    _die_with_parent()
    if os.getppid() == 1:  # orphaned before prctl took effect: the parent is gone
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if memory_bytes > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        key, response, gt = msg
        try:
            verdict = grade(response, gt)
        except MemoryError:
            verdict = Verdict.of(False, "error")
        except RecursionError:
            verdict = Verdict.of(False, "error")
        except Exception:  # noqa: BLE001 - any failure on model output scores 0, never crashes the trainer
            verdict = Verdict.of(False, "error")
        try:
            conn.send((key, dataclasses.astuple(verdict)))
        except (OSError, ValueError):
            return


@dataclasses.dataclass
class _Worker:
    process: mp.Process
    conn: object
    item: tuple | None = None  # (batch, index) being graded
    started: float = 0.0


class _Batch:
    def __init__(self, n: int):
        self.results: list[Verdict | None] = [None] * n
        self.remaining = n
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        if n == 0:
            self.future.set_result([])

    def done(self, i: int, verdict: Verdict) -> None:
        if self.results[i] is None:
            self.results[i] = verdict
            self.remaining -= 1
            if self.remaining == 0:
                self.future.set_result(list(self.results))


class VerifierPool:
    """A pool of grading processes (module docstring).

    Args:
      num_workers: processes (default: the CPU count).
      timeout: seconds one item may run before its worker is killed (default 5, as the official run).
      memory_mb: address-space cap per worker; an item that needs more scores 0 ("error").
      start_method: "forkserver" (default: fast, safe after JAX and threads start) or "spawn".
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout: float = 5.0,
        memory_mb: int = 4096,
        start_method: str = "forkserver",
    ):
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.num_workers = num_workers or os.cpu_count() or 1
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        self.timeout = timeout
        self._memory = memory_mb << 20
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(["attnrl_jax.rewards.math_grader", "math_verify", "sympy"])
        self._pending: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self.stats = collections.Counter()  # timeouts, errors, restarts
        self._workers = [self._start_worker() for _ in range(self.num_workers)]
        self._thread = threading.Thread(target=self._dispatch, name="verifier-dispatch", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, VerifierPool._kill_all, self._workers)
        atexit.register(self.close)

    # -------------------------------------------------------------------------------------------- public
    def submit(self, responses: Sequence[str], ground_truths: Sequence) -> concurrent.futures.Future:
        """Queues a batch; the future resolves to one Verdict per response, in order."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        if self._closed:
            raise RuntimeError("the verifier pool is closed")
        batch = _Batch(len(responses))
        with self._lock:
            for i, (r, gt) in enumerate(zip(responses, ground_truths)):
                gt = gt if isinstance(gt, str) else [str(g) for g in gt]
                self._pending.append((batch, i, r, gt))
        self._wake.set()
        return batch.future

    def score(self, responses: Sequence[str], ground_truths: Sequence) -> list[Verdict]:
        return self.submit(responses, ground_truths).result()

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def close(self) -> None:
        """Kills every worker and stops the dispatcher; pending items are scored 0 ("error")."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)
        VerifierPool._kill_all(self._workers)
        with self._lock:
            while self._pending:
                batch, i, _, _ = self._pending.popleft()
                batch.done(i, Verdict.of(False, "error"))
        atexit.unregister(self.close)

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- internal
    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self._memory), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    @staticmethod
    def _kill_all(workers: list[_Worker]) -> None:
        for w in workers:
            if w.process.is_alive():
                w.process.kill()
        for w in workers:
            w.process.join(timeout=5)
            w.conn.close()

    def _replace(self, idx: int, reason: str) -> None:
        """Kills worker idx, starts its replacement, then scores its item 0 with `reason`."""
        w = self._workers[idx]
        w.process.kill()
        w.process.join(timeout=5)
        w.conn.close()
        self.stats["restarts"] += 1
        self._workers[idx] = self._start_worker()
        if w.item is not None:
            batch, i = w.item
            batch.done(i, Verdict.of(False, reason))

    def _dispatch(self) -> None:
        while not self._closed:
            with self._lock:
                for w in self._workers:
                    if w.item is None and self._pending:
                        batch, i, r, gt = self._pending.popleft()
                        try:
                            w.conn.send(((id(batch), i), r, gt))
                        except (OSError, ValueError):
                            self._pending.appendleft((batch, i, r, gt))
                            continue
                        w.item, w.started = (batch, i), time.monotonic()
            busy = {w.conn: k for k, w in enumerate(self._workers) if w.item is not None}
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            for conn in wait(list(busy), timeout=0.02):
                k = busy[conn]
                w = self._workers[k]
                try:
                    _, fields = conn.recv()
                except (EOFError, OSError):  # the worker died (crash, memory): score 0 and replace it
                    self.stats["errors"] += 1
                    self._replace(k, "error")
                    continue
                batch, i = w.item
                w.item = None
                batch.done(i, Verdict(*fields))
            now = time.monotonic()
            for k, w in enumerate(self._workers):
                if w.item is not None and now - w.started > self.timeout:
                    self.stats["timeouts"] += 1
                    self._replace(k, "timeout")
