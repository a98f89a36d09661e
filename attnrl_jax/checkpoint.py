"""Orbax checkpoints of the trainer: the train state (params, optimizer state, step) plus a JSON record of
everything else a run needs to resume exactly (data position, algorithm state, RNG, the config used).

Orbax writes each step into a temporary directory and renames it when complete, so a crash during a save
never leaves a step that restores wrong: `latest_step()` only sees finished ones. `PreemptionGuard` turns
SIGTERM (a TPU preemption notice) into a flag that the training loop polls to save and exit cleanly.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from attnrl_jax import JobError
from attnrl_jax.data import Problem
from attnrl_jax.rollout import InitialBatch
from attnrl_jax.sampling import Sample


class Checkpointer:
    """Save/restore of (state pytree, JSON metadata) per step under `directory`.

    Args:
      directory: the run's checkpoint directory (created if missing).
      max_to_keep: how many finished steps to keep (oldest deleted first).
    """

    def __init__(self, directory: str, max_to_keep: int = 3):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be at least 1, got {max_to_keep}")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, arrays: dict | None = None) -> None:
        """Saves and waits until the step is complete on disk. `arrays`: optional flat dict of non-empty
        host numpy arrays (the off-policy pipeline's in-flight batch)."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if arrays is not None:
            items["arrays"] = ocp.args.StandardSave(arrays)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restores `step` (default: the latest) into the structure, dtypes and shardings of
        `abstract_state` (arrays or `jax.ShapeDtypeStruct`s with shardings). Returns (state, meta, step)."""
        state, meta, _, step = self.restore_all(abstract_state, step)
        return state, meta, step

    def restore_all(
        self, abstract_state: Any, step: int | None = None, say: Callable[[str], None] = print
    ) -> tuple[Any, dict, dict | None, int]:
        """As `restore`, plus the saved `arrays` (host numpy) or None: (state, meta, arrays, step).

        Without `step`: the newest step that restores. A damaged newer step (a file truncated or deleted, its
        metadata missing) is moved aside to `<directory>.damaged/<step>` (kept, not deleted) and the next
        older kept step is tried, each said with `say`; when none restores, JobError names the newest step
        and what to delete."""
        if step is not None:
            return self._restore_step(abstract_state, step)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no finished checkpoint to restore")
        failures = []
        for s in reversed(steps):
            try:
                out = self._restore_step(abstract_state, s)
            except Exception as e:  # noqa: BLE001 - TensorStore, JSON and Orbax each raise their own types
                failures.append((s, _first_line(e)))
                continue
            for bad, why in failures:
                aside = self._move_aside(bad)
                say(f"checkpoint step {bad} in {self.directory} is damaged ({why}); moved to {aside}")
            if failures:
                say(f"resuming from step {s}, the newest intact step")
            return out
        newest, why = failures[0]
        raise JobError(
            f"{self.directory}: no kept checkpoint step restores (steps {steps}; step {newest}: {why}).\n"
            f"Delete {self.directory} to start the run over (or restore the steps from a copy)."
        )

    def _restore_step(self, abstract_state: Any, step: int) -> tuple[Any, dict, dict | None, int]:
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_state,
        )
        items = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        has_arrays = os.path.isdir(os.path.join(self.directory, str(step), "arrays"))
        if has_arrays:
            items["arrays"] = ocp.args.StandardRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if restored["meta"] is None:
            raise ValueError(f"step {step}: its meta record is missing")
        arrays = None
        if has_arrays:
            arrays = {k: np.asarray(v) for k, v in restored["arrays"].items()}
        return restored["state"], dict(restored["meta"]), arrays, step

    def meta(self, step: int | None = None) -> dict | None:
        """The JSON record of `step` (default: the newest), or None when there is none or it is unreadable
        (a quick look before the model is built; `restore_all` deals with damage)."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception:  # noqa: BLE001 - damaged: restore_all falls back and says so
            return None
        return None if meta is None else dict(meta)

    def _move_aside(self, step: int) -> str:
        aside = os.path.join(self.directory + ".damaged", str(step))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            if os.path.exists(aside):
                aside = f"{aside}.{len(os.listdir(os.path.dirname(aside)))}"
            os.replace(os.path.join(self.directory, str(step)), aside)
        multihost_sync(f"checkpoint-aside-{step}")
        self._manager.reload()
        return aside

    def restore_params(self, step: int | None = None) -> tuple[Any, dict, int]:
        """The saved `params` (host arrays, as written) and the metadata of `step` (default: latest), without
        the optimizer state or a target structure: for evaluation and export."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no finished checkpoint to restore")
        path = os.path.join(self.directory, str(step), "state")
        reader = ocp.PyTreeCheckpointer()
        tree = reader.metadata(path).item_metadata
        # Host numpy arrays: restorable whatever the devices (count, processes) that wrote them.
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return state["params"], dict(meta), step

    def close(self) -> None:
        self._manager.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def multihost_sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class PreemptionGuard:
    """While active, SIGTERM (a preemption notice) and SIGINT (Ctrl-C) set `requested` instead of killing
    the process: the loop saves its step and returns, and `signal_name` says which. A second Ctrl-C stops
    at once (KeyboardInterrupt), for a user who will not wait for the step to finish."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("\nCtrl-C: saving after this step (Ctrl-C again to stop at once)", flush=True)

    def __enter__(self) -> PreemptionGuard:
        self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)


# ------------------------------------------------------------------------------------------------------
# The off-policy pipeline's in-flight batch in a checkpoint


def inflight_to_arrays(batch: InitialBatch) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The off-policy pipeline's in-flight batch as flat numpy arrays (for Orbax) and JSON-able
    problems."""
    flat = [s for group in batch.samples for s in group]
    cat = lambda xs, dt: np.concatenate([np.asarray(x, dt) for x in xs] + [np.zeros(0, dt)])  # noqa: E731
    arrays = {
        "accs": batch.accs().astype(np.float32),
        "prompt_lengths": np.asarray([len(p) for p in batch.prompts], np.int32),
        "prompts": cat(batch.prompts, np.int32),
        "lengths": np.asarray([len(s.tokens) for s in flat], np.int32),
        "tokens": cat([s.tokens for s in flat], np.int32),
        "logprobs": cat([s.logprobs for s in flat], np.float32),
        "entropies": cat([s.entropies for s in flat], np.float32),
        "step_ids": cat([s.step_ids for s in flat], np.int32),
        "fci_lengths": np.asarray([len(s.fci) for s in flat], np.int32),
        "fci": cat([s.fci for s in flat], np.float32),
        "think_step": np.asarray([s.think_step for s in flat], np.int32),
        "eos": np.asarray([s.finish_reason == "eos" for s in flat], np.int32),
        "needs_fallback": np.asarray([s.needs_fallback for s in flat], np.int32),
        "step_overflow": np.asarray([s.step_overflow for s in flat], np.int32),
        "verifier": np.asarray([batch.verifier[k] for k in ("timeouts", "errors", "restarts")], np.int32),
    }
    # Orbax refuses zero-size arrays: each array carries one trailing pad element.
    arrays = {k: np.append(v, np.zeros(1, v.dtype)) for k, v in arrays.items()}
    problems = [
        {
            "index": p.index,
            "data_source": p.data_source,
            "messages": [dict(m) for m in p.messages],
            "ground_truth": p.ground_truth if isinstance(p.ground_truth, str) else list(p.ground_truth),
        }
        for p in batch.problems
    ]
    return arrays, problems


def inflight_from_arrays(arrays: dict, problems: list[dict], decode: Callable) -> InitialBatch:
    """Inverse of `inflight_to_arrays`; `decode(tokens) -> text` re-creates the response texts."""
    a = {k: np.asarray(v)[:-1] for k, v in arrays.items()}  # drop the pad element
    split = lambda x, lengths: np.split(x, np.cumsum(lengths)[:-1]) if len(lengths) else []  # noqa: E731
    probs = [
        Problem(
            int(p["index"]),
            p["data_source"],
            tuple(p["messages"]),
            p["ground_truth"] if isinstance(p["ground_truth"], str) else tuple(p["ground_truth"]),
        )
        for p in problems
    ]
    prompts = [list(map(int, x)) for x in split(a["prompts"], a["prompt_lengths"])]
    fields = [split(a[k], a["lengths"]) for k in ("tokens", "logprobs", "entropies", "step_ids")]
    fcis = split(a["fci"], a["fci_lengths"])
    flat = [
        Sample(
            tokens=tok,
            logprobs=lp,
            entropies=ent,
            finish_reason="eos" if a["eos"][i] else "length",
            text=decode(tok),
            fci=fcis[i],
            step_ids=sid,
            think_step=int(a["think_step"][i]),
            needs_fallback=bool(a["needs_fallback"][i]),
            step_overflow=int(a["step_overflow"][i]) if "step_overflow" in a else 0,
        )
        for i, (tok, lp, ent, sid) in enumerate(zip(*fields))
    ]
    g = len(flat) // max(len(probs), 1)
    samples = [flat[q * g : (q + 1) * g] for q in range(len(probs))]
    accs = a["accs"].astype(np.float64).reshape(len(probs), g)
    counts = a.get("verifier", np.zeros(3, np.int32))  # (checkpoints before restarts were counted: 2)
    keys = ("timeouts", "errors", "restarts")
    counts = {k: int(counts[j]) if j < len(counts) else 0 for j, k in enumerate(keys)}
    return InitialBatch(probs, prompts, samples, accs, counts)
