"""Every shipped config loads and turns into typed settings (paths aside), with the method it names."""

import importlib
import os

import pytest

from attnrl_jax import settings

PAPER = ["attnrl_1p5b", "attnrl_7b", "grpo_1p5b", "treerl_1p5b", "treerl_atb_1p5b", "random_branching_1p5b"]


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs(name):
    c = importlib.import_module(f"configs.{name}").get_config()
    assert c.job == "train" and c.sampler.max_new_tokens == 8192 and c.algo.group_size == 6
    assert c.optim.lr == 1e-6 and c.loss.kl_coef == 0.001 and c.train.mini_batch_rows == 192
    with pytest.raises(FileNotFoundError, match="config.model.hf_path|config.data.train_path"):
        settings.settings_from_config(c)  # no checkpoint or data here: a clear error, before any work
    expected = name[: -len("_1p5b")] if name.endswith("_1p5b") else "attnrl"
    assert c.algo.preset == expected
    assert c.train.off_policy == (expected not in ("treerl", "treerl_atb"))


def test_task_config():
    c = importlib.import_module("configs.task").get_config()
    assert c.job == "task" and c.algo.fci_delta == 1 and c.train.off_policy


def test_a_preset_keeps_its_own_settings_unless_the_user_sets_them():
    import configs.base as base

    c = base.get_config()
    assert c.algo.token_distance is None  # unset: the preset decides
    c.algo.preset = "paper"
    assert settings.algo_config(c).atb.token_distance == 0  # the paper's rule, not the code's 512
    c.algo.preset = "attnrl"
    assert settings.algo_config(c).atb.token_distance == 512
    c.algo.token_distance = 64  # an explicit setting wins over any preset
    c.algo.preset = "paper"
    assert settings.algo_config(c).atb.token_distance == 64


def test_token_distance_from_the_command_line():
    """A placeholder field still takes an int override from flags, and refuses a string."""
    import subprocess
    import sys

    probe = (
        "import sys; from absl import flags; from ml_collections import config_flags;"
        "c = config_flags.DEFINE_config_file('config', lock_config=True);"
        "flags.FLAGS(sys.argv); print(c.value.algo.token_distance)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def parse(value):
        cmd = [
            sys.executable,
            "-c",
            probe,
            "--config=configs/base.py",
            f"--config.algo.token_distance={value}",
        ]
        return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)

    ok = parse(0)
    assert ok.returncode == 0 and ok.stdout.strip() == "0", ok.stderr[-2000:]
    bad = parse("far")
    assert bad.returncode != 0 and "token_distance" in bad.stderr
