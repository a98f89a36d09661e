"""Batch scoring in a pool of worker processes with a per-item time limit enforced from outside.

Math-Verify and sympy cannot be interrupted reliably from inside (Math-Verify's own timeout uses
`signal.alarm`, which refuses threads), and a policy under optimisation can write anything: a tower of
exponents, a megabyte of braces. So every item runs in a worker process; a dispatcher thread hands items to
idle workers and kills (SIGKILL, with its process group) any worker whose item runs past the limit or whose
memory passes its cap, scores that item 0 with reason "timeout" (or "error"), and starts a replacement.
Queue time does not count against an item's limit.

The pool heals whatever happens to a worker:
  * every request carries a fresh key and a reply is accepted only for the key its worker was sent; a
    worker that answers anything else is out of step and is replaced (its item sent to the replacement);
  * a worker that dies, busy or idle (crash, OOM killer, `kill` from outside), is seen through its process
    sentinel and replaced before it is handed work; its item, if it had one, is sent again, and scored
    "error" only after it has been sent MAX_SENDS times (then it is the item that kills workers);
  * an item that cannot be sent (it does not pickle) is scored "error" on its own; the rest of its batch
    and later batches are unaffected; the dispatcher thread survives any exception and logs it.
Each verdict counts the worker restarts its item cost (`Verdict.restarts`; a dead idle worker's restart is
charged to the next item its replacement serves), so timeouts, errors and restarts reach the step metrics.

Ground truths are checked at `submit` (a non-empty string or list of strings, integers allowed): a bad one
raises ValueError naming its index, and nothing of that batch is queued.

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
import ctypes
import dataclasses
import itertools
import logging
import multiprocessing as mp
import os
import resource
import signal
import threading
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler

from attnrl_jax.rewards.math_grader import Verdict, grade, ground_truths

log = logging.getLogger(__name__)

MAX_SENDS = 3  # an item whose worker dies before it is received is sent again, this many times at most
# Workers that keep dying with no verdict in between (they cannot start: a broken install, a main module
# without the `if __name__ == "__main__"` guard) make the pool refuse work with an error rather than score
# everything 0 and restart forever.
MAX_DEATHS_IN_A_ROW = 12


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent exits (prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def _worker_main(conn, memory_bytes: int) -> None:
    _die_with_parent()
    if os.getppid() == 1:  # orphaned before prctl took effect: the parent is gone
        os._exit(0)
    try:
        os.setpgid(0, 0)  # its own process group, so that a kill takes anything it started with it
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    while True:
        try:
            msg = conn.recv()
        except Exception:  # noqa: BLE001 - the pipe closed, or a message that does not unpickle here
            return
        if msg is None:
            return
        key, response, gt = msg
        try:
            verdict = grade(response, gt)
        except BaseException:  # noqa: BLE001 - any failure on model output scores 0, never kills the pool
            verdict = Verdict.of(False, "error")
        try:
            conn.send((key, dataclasses.astuple(verdict)))
        except (OSError, ValueError):
            return


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


@dataclasses.dataclass
class _Item:
    batch: _Batch
    index: int
    response: object
    gt: list[str]
    restarts: int = 0  # worker restarts this item has cost so far
    sends: int = 0

    def finish(self, verdict: Verdict) -> None:
        self.batch.done(self.index, dataclasses.replace(verdict, restarts=self.restarts))


@dataclasses.dataclass
class _Worker:
    process: mp.Process
    conn: object
    item: _Item | None = None
    key: int = -1  # the key of the request it was sent
    started: float = 0.0
    unbilled_restarts: int = 0  # restarts of this slot not yet charged to an item


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
        self._pending: collections.deque[_Item] = collections.deque()
        self._lock = threading.Lock()
        self._keys = itertools.count()
        self._wake_r, self._wake_w = os.pipe()  # submit and close write a byte: the dispatcher wakes at once
        os.set_blocking(self._wake_r, False)
        self._closed = False
        self._broken: str | None = None
        self._deaths_in_a_row = 0
        self.stats = collections.Counter()  # timeouts, errors, restarts, dispatcher_faults
        self._workers = [self._start_worker() for _ in range(self.num_workers)]
        self._thread = threading.Thread(target=self._dispatch, name="verifier-dispatch", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, VerifierPool._kill_all, self._workers)
        atexit.register(self.close)

    # -------------------------------------------------------------------------------------------- public
    def submit(self, responses: Sequence[str], ground_truths: Sequence) -> concurrent.futures.Future:
        """Queues a batch; the future resolves to one Verdict per response, in order.

        Raises ValueError, queuing nothing, when the lengths differ or a ground truth is not a non-empty
        string or list of strings (the message names its index)."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        if self._broken:
            raise RuntimeError(self._broken)
        if self._closed:
            raise RuntimeError("the verifier pool is closed")
        gts = [_checked_ground_truth(i, gt) for i, gt in enumerate(ground_truths)]
        batch = _Batch(len(responses))
        with self._lock:
            self._pending.extend(_Item(batch, i, r, gt) for i, (r, gt) in enumerate(zip(responses, gts)))
        self._wake()
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
        self._wake()
        self._thread.join(timeout=10)
        VerifierPool._kill_all(self._workers)
        with self._lock:
            for w in self._workers:
                if w.item is not None:
                    w.item.finish(Verdict.of(False, "error"))
                    w.item = None
            while self._pending:
                self._pending.popleft().finish(Verdict.of(False, "error"))
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        atexit.unregister(self.close)

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- internal
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):  # the pipe is full (the dispatcher will wake anyway) or closed
            pass

    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self._memory), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    @staticmethod
    def _kill(w: _Worker) -> None:
        pid = w.process.pid
        try:
            if pid is not None and os.getpgid(pid) == pid:  # its own group: take whatever it forked too
                os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        if w.process.is_alive():
            w.process.kill()

    @staticmethod
    def _kill_all(workers: list[_Worker]) -> None:
        for w in workers:
            VerifierPool._kill(w)
        for w in workers:
            w.process.join(timeout=5)
            w.conn.close()

    def _replace(self, idx: int, reason: str | None) -> None:
        """Kills worker idx and starts its replacement. Its item, if any, is scored 0 with `reason`; with
        None (the worker died or fell out of step: not known to be the item's doing) it is sent again, and
        scored "error" once it has been sent MAX_SENDS times (an item that crashes every worker it meets).
        The restart is charged to that item, or else to the next item the replacement serves."""
        w = self._workers[idx]
        if self._broken:
            return
        self._kill(w)
        w.process.join(timeout=5)
        w.conn.close()
        self.stats["restarts"] += 1
        if reason != "timeout":
            self._deaths_in_a_row += 1
            if self._deaths_in_a_row >= MAX_DEATHS_IN_A_ROW:
                self._break(w)
                return
        item, w.item = w.item, None
        unbilled = w.unbilled_restarts + 1
        if item is not None:
            item.restarts += unbilled
            unbilled = 0
        try:  # the replacement is in place before the item's verdict can wake anyone
            new = self._start_worker()
            new.unbilled_restarts = unbilled
            self._workers[idx] = new
        finally:
            if item is not None and reason is None and item.sends < MAX_SENDS:
                self._pending.appendleft(item)
            elif item is not None:
                if reason != "timeout":  # (timeouts are counted where they are found)
                    self.stats["errors"] += 1
                item.finish(Verdict.of(False, reason or "error"))

    def _break(self, w: _Worker) -> None:
        """Gives up: every queued and in-flight item's future raises, and so does every later submit."""
        self._broken = (
            f"verifier pool: {self._deaths_in_a_row} worker processes died in a row without a verdict "
            f"(the last exit code {w.process.exitcode}); they cannot run `grade`. A script that starts the "
            f"pool needs the `if __name__ == '__main__':` guard (forkserver and spawn re-import it)."
        )
        log.error(self._broken)
        VerifierPool._kill_all(self._workers)
        failed = [x.item for x in self._workers if x.item is not None] + list(self._pending)
        self._pending.clear()
        for x in self._workers:
            x.item = None
        for item in failed:
            if not item.batch.future.done():
                item.batch.future.set_exception(RuntimeError(self._broken))

    def _dispatch(self) -> None:
        while not (self._closed or self._broken):
            try:
                self._step()
            except Exception:  # noqa: BLE001 - the dispatcher must outlive anything; say what happened
                self.stats["dispatcher_faults"] += 1
                log.exception("verifier pool: dispatcher fault (recovering)")
                time.sleep(0.05)

    def _hand_out(self) -> None:
        with self._lock:
            for k in range(len(self._workers)):
                while self._workers[k].item is None and self._pending and not (self._closed or self._broken):
                    w = self._workers[k]
                    if not w.process.is_alive():  # died while idle: never hand it work
                        self._replace(k, None)
                        continue
                    item = self._pending.popleft()
                    key = next(self._keys)
                    try:
                        data = ForkingPickler.dumps((key, item.response, item.gt))
                    except Exception:  # noqa: BLE001 - cannot be sent: this item alone is an error
                        self.stats["errors"] += 1
                        item.finish(Verdict.of(False, "error"))
                        continue
                    item.sends += 1
                    w.item, w.key, w.started = item, key, time.monotonic()
                    item.restarts += w.unbilled_restarts
                    w.unbilled_restarts = 0
                    try:
                        w.conn.send_bytes(data)
                    except (OSError, ValueError):  # it died after the check: replace it, send again
                        self._replace(k, None)

    def _step(self) -> None:
        self._hand_out()
        busy = {w.conn: w for w in self._workers if w.item is not None}
        sentinels = {w.process.sentinel: w for w in self._workers}
        ready = wait([self._wake_r, *busy, *sentinels], timeout=0.02 if busy else 1.0)
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass
        with self._lock:
            for conn in (r for r in ready if r in busy):
                w = busy[conn]
                if w not in self._workers or w.item is None:
                    continue
                k = self._workers.index(w)
                try:
                    key, fields = conn.recv()
                except (EOFError, OSError):  # it died while grading (killed, or a crash its item caused)
                    self._replace(k, None)
                    continue
                if key != w.key:  # out of step with its requests: never trust it again (item sent anew)
                    log.warning("verifier pool: worker %d answered key %s for %s", w.process.pid, key, w.key)
                    self._replace(k, None)
                    continue
                item, w.item = w.item, None
                self._deaths_in_a_row = 0
                item.finish(Verdict(*fields))
            for sentinel in (r for r in ready if r in sentinels):
                w = sentinels[sentinel]
                if w in self._workers and not w.process.is_alive():
                    if w.item is not None and w.conn.poll():
                        continue  # its last reply is waiting: read it on the next pass first
                    self._replace(self._workers.index(w), None)
            now = time.monotonic()
            for k, w in enumerate(self._workers):
                if w.item is not None and now - w.started > self.timeout:
                    self.stats["timeouts"] += 1
                    self._replace(k, "timeout")


def _checked_ground_truth(i: int, gt) -> list[str]:
    try:
        return ground_truths(gt)
    except ValueError as e:
        raise ValueError(f"ground_truths[{i}]: {e}") from None
