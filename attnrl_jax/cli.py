"""What `train.py` and `eval.py` share before a job starts: config overrides whose mistakes read as one line.

ml-collections raises a bare AttributeError (with a 40-50 line traceback) for an override of a key the
config does not have (`--config.optim.lrr=1e-3`, `--config.optimizer.lr=...`); `exit_on_unknown_keys`
looks first and exits 1 with one line naming the full key and the closest valid one (absl's own flag errors,
a value of the wrong type for instance, are already short).
"""

from __future__ import annotations

import importlib.util
import os
import sys

from attnrl_jax.run_record import closest_key


def _config_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _override_keys(argv: list[str]) -> list[str]:
    out = []
    for arg in argv[1:]:
        if arg.startswith("--config.") or arg.startswith("--noconfig.") or arg.startswith("--no_config."):
            name = arg.split("=", 1)[0].lstrip("-")
            out.append(name.removeprefix("no_").removeprefix("no").removeprefix("config."))
    return out


def load_config_file(spec: str):
    """The ConfigDict of `path[:variant]`, as ml-collections' config flag builds it (the caller's working
    directory on sys.path, so `from configs import base` resolves)."""
    path, _, variant = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_spec = importlib.util.spec_from_file_location("_attnrl_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def unknown_key_message(argv: list[str], default_config: str | None = None) -> str | None:
    """The first `--config.KEY` of argv that the config has no such key for, as one line with the closest
    valid key; None when every key exists (or the config file itself does not load)."""
    spec = _config_arg(argv) or default_config
    if spec is None:
        return None
    try:
        config = load_config_file(spec).to_dict()
    except Exception:  # noqa: BLE001 - absl reports a config file that does not load
        return None
    for key in _override_keys(argv):
        node, ok = config, True
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                ok = False
                break
            node = node[part]
        if not ok:
            near = closest_key(key, config)
            hint = f"; did you mean config.{near}?" if near else ""
            return f"error: --config.{key}: {spec} has no setting config.{key}{hint}"
    return None


def exit_on_unknown_keys(argv: list[str], default_config: str | None = None) -> None:
    """Exits 1 with one line when argv overrides a key its config does not have. Call it before the config
    flag is defined: with a default config file, ml-collections applies the overrides right there."""
    message = unknown_key_message(argv, default_config)
    if message is not None:
        sys.exit(message)


def apply_sets(c, items: list[str], flag: str = "--set") -> None:
    """Applies "a.b=value" overrides to the ConfigDict `c` in place, each value parsed as the type of the
    value it replaces (a bool as true/false); a key the config lacks, a missing "=" or a value that does not
    parse exits with one line naming the item and the closest valid key. For the benchmarks' `--set`."""
    for item in items:
        key, sep, value = item.partition("=")
        parent, _, leaf = key.rpartition(".")
        node = c
        try:
            for part in parent.split(".") if parent else []:
                node = node[part]
            present = sep and leaf in node
        except (KeyError, TypeError):
            present = False
        if not present:
            hint = closest_key(key, c.to_dict())
            raise SystemExit(
                f"{flag} {item!r}: expected an existing config key and a value, e.g. task.warm_batch=8"
                + (f" (closest key: {hint})" if hint else "")
            )
        kind = type(node[leaf])
        if kind is bool:
            if value not in ("true", "false"):
                raise SystemExit(f"{flag} {item!r}: expected true or false")
            node[leaf] = value == "true"
            continue
        try:
            node[leaf] = kind(value)
        except (TypeError, ValueError):
            raise SystemExit(f"{flag} {item!r}: expected a {kind.__name__}") from None
