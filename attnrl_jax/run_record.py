"""What a run is: the settings that determine a result, kept beside the result and compared on every rerun
or resume, so that a workdir never silently answers for other settings than the ones that made it.

A setting is one of three kinds:
  * operational (`OPERATIONAL`): where things go, how fast, and what is measured beside the run, never what
    it trains (the workdir, verifier processes, checkpoint cadence, multi-process wiring, the report's
    sample count, held-out evaluations). Not recorded.
  * acceptable (`ACCEPTABLE`): changes a resumed run may take when the user says so with
    `--config.accept_changes=KEY[,KEY]`: `train.steps` and the budgets (`train.max_generated_tokens`,
    `max_paths`, `max_optimizer_steps`) extend (or end) the run; the mesh, the sampler's memory budget and
    the state offload follow a change of hardware.
  * everything else: a different run. Resuming under it would train on batches sampled under the old
    settings (the off-policy in-flight batch) and mix two methods in one curve, so it needs a new workdir.

Pure functions of nested dicts (`ConfigDict.to_dict()`), checked by tests/run_record_test.py.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping

from attnrl_jax import JobError

# Prefixes (a key or a key followed by ".") of settings that never change a result.
OPERATIONAL = (
    "workdir",
    "accept_changes",
    "reward.workers",
    "ckpt.every",
    "ckpt.max_to_keep",
    "ckpt.export",
    "distributed",
    "task.report_samples",
    "task.anchor_problems",
    "heldout",  # measurements of the policy beside the run, never inputs of it
)

# Settings a resumed run takes with --config.accept_changes=KEY.
ACCEPTABLE = (
    "train.steps",
    "train.max_generated_tokens",
    "train.max_paths",
    "train.max_optimizer_steps",
    "train.offload_state",
    "train.rows_per_device",
    "reward.timeout",
    "sampler.cache_gib",
    "sampler.memory_fraction",
    "mesh",
)


def under(key: str, prefixes: Iterable[str]) -> bool:
    """Whether `key` is one of `prefixes` or lies below one ("mesh" covers "mesh.data")."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; values made JSON-plain (tuples as lists), so a record read back from
    JSON compares equal to one computed now."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.loads(json.dumps(v, default=str))
    return out


# Settings that name files. One that lies beside the run's workdir (the task job's warm start and data, next
# to its RL run) is recorded relative to the workdir's parent, so a workdir copied or moved whole resumes.
PATH_KEYS = ("model.hf_path", "tokenizer_path", "data.train_path")


def fingerprint(config: Mapping, keep=None) -> dict:
    """The result-determining settings of `config` (a nested dict) as a flat {key: value} dict; `keep`:
    optional predicate on the flat key (a stage that reads only some settings)."""
    flat = flatten(config)
    root = os.path.dirname(os.path.abspath(flat["workdir"])) if flat.get("workdir") else None
    for key in PATH_KEYS:
        path = flat.get(key)
        if root and path and os.path.isabs(path) and os.path.commonpath([root, path]) == root:
            flat[key] = os.path.join("<workdir>/..", os.path.relpath(path, root))
    return {k: v for k, v in flat.items() if not under(k, OPERATIONAL) and (keep is None or keep(k))}


# Settings added after runs began to be recorded, with the value that every run recorded before them had:
# a record without the key reads as that value, so an older run resumes under the new default.
ADDED_SINCE = {
    "train.max_paths": 0,
    "train.max_optimizer_steps": 0,
    "loss.objective": "ppo_clip",
}


def differences(old: Mapping, new: Mapping) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every key whose value differs, sorted; a key one side lacks counts as
    its `ADDED_SINCE` value there, or None (a setting added since, whose unset default is None, is no
    difference)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, ADDED_SINCE.get(key)), new.get(key, ADDED_SINCE.get(key))
        if a != b:
            out.append((key, a, b))
    return out


def accepted_keys(config: Mapping) -> set[str]:
    """The keys of `config.accept_changes` (comma-separated); each must be an ACCEPTABLE setting."""
    raw = str(config.get("accept_changes", "") or "")
    keys = {k.strip().removeprefix("config.") for k in raw.split(",") if k.strip()}
    bad = sorted(k for k in keys if not under(k, ACCEPTABLE))
    if bad:
        raise ValueError(
            f"config.accept_changes={raw!r}: {', '.join(bad)} cannot be changed within a run (it changes "
            f"what the run computes); acceptable: {', '.join(ACCEPTABLE)}"
        )
    return keys


def check_same(
    recorded: Mapping, current: Mapping, accepted: set[str], what: str, how: str
) -> list[tuple[str, object, object]]:
    """Compares a recorded fingerprint with the current one. Returns the differences, all of them accepted
    (the caller re-runs what they affect); raises JobError naming every other one with its old and new
    value and what to do. `what`: the thing recorded ("the AttnRL run in runs/task/rl"); `how`: the way to
    a fresh one ("use a new config.workdir")."""
    diffs = differences(recorded, current)
    refused = [d for d in diffs if not under(d[0], accepted)]
    if not refused:
        return diffs
    lines = [f"{what} was made with other settings:"]
    for key, old, new in refused:
        lines.append(f"  config.{key}: {old!r} there, {new!r} now")
    acceptable = [k for k, _, _ in refused if under(k, ACCEPTABLE)]
    other = [k for k, _, _ in refused if not under(k, ACCEPTABLE)]
    if other:
        lines.append(f"To run with these settings, {how}; to go on with this run, use its settings.")
    if acceptable:
        verb = "also add" if other else "add"
        lines.append(
            f"To {'take' if other else 'go on with'} {', '.join(acceptable)} within this run, {verb} "
            f"--config.accept_changes={','.join(acceptable)}"
            + (" (train.steps extends or ends the run)" if "train.steps" in acceptable else "")
        )
    raise JobError("\n".join(lines))


def closest_key(key: str, config: Mapping) -> str | None:
    """The valid full key of `config` closest to `key` (a mistyped override), or None."""
    keys = list(flatten(config)) + [k for k in _sections(config)]
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if match:
        return match[0]
    # A right leaf under a wrong section ("optimizer.lr"): the same leaf name in the closest section.
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    match = difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.0)
    return match[0] if match else None


def _sections(config: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.append(prefix + k)
            out.extend(_sections(v, prefix + k + "."))
    return out


def check_workdir(path: str, key: str = "config.workdir") -> None:
    """Refuses, before any work, a workdir that exists and is not a directory (or lies under a file)."""
    if not path:
        raise ValueError(f"{key} is empty; expected a directory for the run's outputs")
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise FileExistsError(f"{key}={path!r}: {probe} is a file, not a directory; give another workdir")


def identity(argv: list[str] | None = None) -> dict:
    """Who ran what: the command line, its config file and overrides (the run's difference from the
    shipped config), the source commit ("-dirty" with uncommitted changes; "unknown" outside a git
    checkout), the UTC time and the versions that matter. The task job appends one per invocation to
    <workdir>/runs.jsonl, and its report shows them."""
    import datetime
    import platform
    import subprocess
    import sys

    import jax

    argv = list(sys.argv if argv is None else argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        try:
            done = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short=12", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    config = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [a[2:] for a in argv if a.startswith("--config.") or a.startswith("--noconfig.")]
    return {
        "command": " ".join(["python", os.path.basename(argv[0]) if argv else "?", *argv[1:]]),
        "config": config,
        "overrides": overrides,
        "commit": commit or "unknown",
        "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.node()} ({jax.device_count()} {jax.devices()[0].platform} device(s))",
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
    }
