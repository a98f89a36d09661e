"""A run's record of its settings (`attnrl_jax/run_record.py`): what is recorded, how a rerun under other
settings is refused or taken, the closest key for a mistyped override, and the workdir check."""

import pytest

from attnrl_jax import JobError
from attnrl_jax.run_record import (
    accepted_keys,
    check_same,
    check_workdir,
    closest_key,
    differences,
    fingerprint,
    flatten,
)

CONFIG = {
    "workdir": "/runs/a/rl",
    "accept_changes": "",
    "model": {"hf_path": "/runs/a/warm", "dtype": "float32"},
    "data": {"train_path": "/data/train.parquet"},
    "optim": {"lr": 3e-4},
    "algo": {"preset": "attnrl", "group_size": 6},
    "train": {"steps": 2, "shape": (1, 2)},
    "reward": {"workers": 1, "timeout": 5.0},
    "ckpt": {"every": 1},
    "eval": {"k": 4},
}


def _with(**changes):
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in CONFIG.items()}
    for key, value in changes.items():
        section, leaf = key.split("__")
        out[section][leaf] = value
    return out


def test_the_record_leaves_out_what_never_changes_a_result():
    fp = fingerprint(CONFIG)
    assert "workdir" not in fp and "reward.workers" not in fp and "ckpt.every" not in fp
    assert fp["optim.lr"] == 3e-4 and fp["reward.timeout"] == 5.0
    assert fp["train.shape"] == [1, 2]  # JSON-plain: equal to the same record read back from JSON
    assert flatten({"a": {"b": {"c": 1}}}) == {"a.b.c": 1}
    # A file beside the workdir is recorded relative to it; one elsewhere as given.
    assert fp["model.hf_path"] == "<workdir>/../warm" and fp["data.train_path"] == "/data/train.parquet"
    moved = _with(model__hf_path="/elsewhere/b/warm")
    moved["workdir"] = "/elsewhere/b/rl"
    assert differences(fp, fingerprint(moved)) == []  # the same run, copied whole
    assert fingerprint(CONFIG, keep=lambda k: k.startswith("algo.")) == {
        "algo.preset": "attnrl",
        "algo.group_size": 6,
    }


def test_other_settings_are_refused_naming_each_key_with_both_values():
    with pytest.raises(JobError) as e:
        check_same(
            fingerprint(CONFIG),
            fingerprint(_with(algo__preset="grpo", optim__lr=1e-2)),
            set(),
            "the run in X",
            "use a new config.workdir",
        )
    lines = str(e.value).splitlines()
    assert lines[0] == "the run in X was made with other settings:"
    assert "  config.algo.preset: 'attnrl' there, 'grpo' now" in lines
    assert "  config.optim.lr: 0.0003 there, 0.01 now" in lines
    assert "use a new config.workdir" in lines[-1]
    # Operational settings never stop a rerun.
    assert check_same(fingerprint(CONFIG), fingerprint(_with(reward__workers=8)), set(), "x", "y") == []


def test_a_longer_run_is_taken_only_when_accepted():
    old, new = fingerprint(CONFIG), fingerprint(_with(train__steps=4))
    with pytest.raises(JobError, match="add --config.accept_changes=train.steps"):
        check_same(old, new, set(), "x", "y")
    assert check_same(old, new, {"train.steps"}, "x", "y") == [("train.steps", 2, 4)]
    # Accepting one key does not accept another.
    with pytest.raises(JobError, match="optim.lr"):
        check_same(old, fingerprint(_with(train__steps=4, optim__lr=1.0)), {"train.steps"}, "x", "y")


def test_only_acceptable_keys_can_be_accepted():
    assert accepted_keys({"accept_changes": "train.steps, config.mesh.data"}) == {"train.steps", "mesh.data"}
    assert accepted_keys({}) == set()
    with pytest.raises(ValueError, match="algo.preset cannot be changed within a run"):
        accepted_keys({"accept_changes": "train.steps,algo.preset"})


@pytest.mark.parametrize(
    "typed,closest",
    [
        ("optim.lrr", "optim.lr"),
        ("optimizer.lr", "optim.lr"),
        ("eval.kk", "eval.k"),
        ("algo.grup_size", "algo.group_size"),
    ],
)
def test_the_closest_valid_key_of_a_mistyped_override(typed, closest):
    assert closest_key(typed, CONFIG) == closest


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    for path in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(FileExistsError, match="is a file, not a directory"):
            check_workdir(str(path))
    check_workdir(str(tmp_path / "new" / "dir"))  # not there yet: fine


def test_a_setting_added_since_with_an_unset_default_is_no_difference():
    assert differences({"a.b": 1}, {"a.b": 1, "a.new": None}) == []
    assert differences({"a.b": 1}, {"a.b": 1, "a.new": 2}) == [("a.new", None, 2)]
    # a key added since with the value older runs had (ADDED_SINCE): no difference at it, one elsewhere
    assert differences({"a.b": 1}, {"a.b": 1, "train.max_paths": 0}) == []
    assert differences({"a.b": 1}, {"a.b": 1, "train.max_paths": 5}) == [("train.max_paths", 0, 5)]
