"""The training loop on a tiny Qwen2 over the real Qwen vocabulary: each method trains, checkpoints, and a
run resumed from step 2 repeats step 3 of the uninterrupted run exactly."""

import jax
import numpy as np
import pytest

from attnrl_jax.checkpoint import Checkpointer
from attnrl_jax.data import Problem, write_verl_parquet


@pytest.fixture(scope="module")
def world(qwen_world, tmp_path_factory):
    tok, model, _, _, _ = qwen_world
    root = tmp_path_factory.mktemp("trainer")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    problems = [Problem(i, "toy", ({"role": "user", "content": f"Say two, {i}."},), "2") for i in range(6)]
    write_verl_parquet(str(root / "train.parquet"), problems)
    return root


def _config(world, workdir, steps, preset="attnrl"):
    import configs.base as base

    c = base.get_config()
    c.workdir = str(workdir)
    c.model.hf_path = str(world / "model")
    c.model.param_dtype = c.model.dtype = "float32"
    c.model.attention_impl = "xla"
    c.data.train_path = str(world / "train.parquet")
    c.data.max_prompt_len = 32
    c.algo.preset = preset
    c.algo.group_size = 4
    c.algo.token_distance = 0
    c.algo.fci_buckets = 16
    c.algo.initial_batch = 2
    c.algo.target_paths = 20
    c.sampler.max_new_tokens = 10
    c.optim.lr = 1e-3
    c.train.steps = steps
    c.train.micro_batches = 2
    c.train.row_length = 48
    c.reward.workers = 1
    c.ckpt.every = 1
    return c


def _params(workdir):
    ckpt = Checkpointer(str(workdir / "ckpt"))
    step = ckpt.latest_step()
    from orbax.checkpoint import PyTreeCheckpointer

    tree = PyTreeCheckpointer().restore(str(workdir / "ckpt" / str(step) / "state"))
    return step, tree["params"]


@pytest.mark.parametrize("preset", ["attnrl", "grpo", "treerl"])
def test_each_method_trains_three_steps(world, tmp_path, preset):
    from attnrl_jax import trainer

    metrics = trainer.run(_config(world, tmp_path, 3, preset))
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    step, params = _params(tmp_path)
    assert step == 3
    from attnrl_jax.model.hf_io import load_checkpoint

    _, initial, _ = load_checkpoint(str(world / "model"))
    diffs = [
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(initial))
    ]
    assert max(diffs) > 0  # the parameters changed
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


@pytest.mark.benchmark  # about 4 minutes on 2 cores: run with `pytest -m benchmark tests/trainer_test.py`
def test_resume_from_step_two_repeats_step_three(world, tmp_path):
    from attnrl_jax import trainer

    trainer.run(_config(world, tmp_path / "straight", 3))
    trainer.run(_config(world, tmp_path / "split", 2))
    trainer.run(_config(world, tmp_path / "split", 3))  # resumes from step 2
    s1, p1 = _params(tmp_path / "straight")
    s2, p2 = _params(tmp_path / "split")
    assert s1 == s2 == 3
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
