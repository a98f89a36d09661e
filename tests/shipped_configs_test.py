"""Every shipped training config runs one full step as shipped, and eval.py runs with configs/eval.py.

Only what cannot run on a CPU is replaced: the model (the tiny random Qwen2 of `task_world`), the data (its
tiny parquet) and the sizes (batch, lengths, buckets). Every other setting keeps its shipped value,
`model.attention_impl` ("pallas": the kernels, interpreted on the CPU), the dtypes, remat, the mesh and the
algorithm settings (preset, G, T, token distance, clip, KL) included, so a shipped default that crashes
fails here.
"""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

# Integration: whole jobs, subprocesses or real-compiler builds (make test-fast leaves it out).
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The settings a CPU test may change; everything else is as shipped.
SIZES = {
    "data.max_prompt_len": 40,
    "algo.initial_batch": 2,
    "algo.target_paths": 16,
    "algo.max_batch": 4,
    "algo.fci_buckets": 16,
    "sampler.max_new_tokens": 10,
    "train.steps": 1,
    "train.mini_batch_rows": 16,
    "train.rows_per_device": 1,
    "train.row_length": 56,
    "reward.workers": 1,
}


def _training_configs() -> list[str]:
    names = []
    for path in sorted((ROOT / "configs").glob("*.py")):
        if path.stem.startswith("_"):
            continue
        if importlib.import_module(f"configs.{path.stem}").get_config().get("job") == "train":
            names.append(path.stem)
    return names


def _set(c, key, value):
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


def test_every_paper_config_is_covered():
    assert set(_training_configs()) >= {
        "attnrl_1p5b",
        "grpo_1p5b",
        "treerl_1p5b",
        "treerl_atb_1p5b",
        "random_branching_1p5b",
        "attnrl_7b",
    }


@pytest.mark.parametrize("name", _training_configs())
def test_shipped_training_config_runs_one_step(name, task_world, tmp_path):
    from attnrl_jax import trainer

    c = importlib.import_module(f"configs.{name}").get_config()
    shipped = c.to_dict()
    assert c.model.attention_impl == "pallas"
    c.workdir = str(tmp_path)
    c.model.hf_path = str(task_world / "model")
    c.data.train_path = str(task_world / "train.parquet")
    for key, value in SIZES.items():
        _set(c, key, value)
    trainer.run(c)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert records[0]["num_paths"] > 0
    if "update/finite" in records[0]:
        assert records[0]["update/finite"] == 1.0
    assert (tmp_path / "ckpt").is_dir()
    # The run used the shipped settings: the config saved with the checkpoint differs from the shipped
    # one only in the keys above.
    saved = c.to_dict()
    changed = {
        f"{section}.{key}"
        for section, values in shipped.items()
        if isinstance(values, dict)
        for key in values
        if values[key] != saved[section][key]
    }
    assert changed <= set(SIZES) | {"model.hf_path", "data.train_path"}


def test_eval_with_the_shipped_eval_config(task_world, tmp_path):
    from attnrl_jax.data import Problem, write_verl_parquet

    problems = [
        Problem(i, "arith", ({"role": "user", "content": f"Start at {i}. Add 1."},), "2") for i in range(3)
    ]
    write_verl_parquet(str(tmp_path / "bench.parquet"), problems)
    cmd = [
        sys.executable,
        "eval.py",
        "--config=configs/eval.py",
        f"--checkpoint={task_world / 'model'}",
        f"--config.eval.data={tmp_path / 'bench.parquet'}",
        f"--config.eval.output={tmp_path / 'results'}",
        "--config.eval.k=2",
        "--config.eval.max_new_tokens=8",
        "--config.eval.batch_prompts=4",
        "--config.reward.workers=1",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [b["problems"] for b in results["benchmarks"].values()] == [3]
