"""Every shipped config loads and turns into typed settings (paths aside), with the method it names."""

import importlib

import pytest

from attnrl_jax import trainer

PAPER = ["attnrl_1p5b", "attnrl_7b", "grpo_1p5b", "treerl_1p5b", "treerl_atb_1p5b", "random_branching_1p5b"]


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs(name):
    c = importlib.import_module(f"configs.{name}").get_config()
    assert c.job == "train" and c.sampler.max_new_tokens == 8192 and c.algo.group_size == 6
    assert c.optim.lr == 1e-6 and c.loss.kl_coef == 0.001 and c.train.mini_batch_rows == 192
    with pytest.raises(FileNotFoundError, match="config.model.hf_path|config.data.train_path"):
        trainer.settings_from_config(c)  # no checkpoint or data here: a clear error, before any work
    expected = name[: -len("_1p5b")] if name.endswith("_1p5b") else "attnrl"
    assert c.algo.preset == expected
    assert c.train.off_policy == (expected not in ("treerl", "treerl_atb"))


def test_task_config():
    c = importlib.import_module("configs.task").get_config()
    assert c.job == "task" and c.algo.fci_delta == 1 and c.train.off_policy
