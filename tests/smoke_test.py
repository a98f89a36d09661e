"""The README's main command runs end to end; bad settings fail fast with a clear message."""

import os
import subprocess
import sys

import pytest

# Integration: whole jobs, subprocesses or real-compiler builds (make test-fast leaves it out).
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(tmp_path, *overrides):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    cmd = [sys.executable, "train.py", "--config=configs/tiny.py", f"--config.workdir={tmp_path}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_smoke_run_on_a_2x2_mesh(tmp_path):
    out = _train(tmp_path, "--config.mesh.tensor=2", "--config.smoke.seq_len=32", "--config.smoke.iters=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 2}" in out.stdout
    assert "reload_max_abs_diff  0" in out.stdout
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors")
    # The exported checkpoint is a valid input of the same job.
    again = _train(tmp_path / "again", f"--config.model.hf_path={tmp_path / 'hf'}", "--config.smoke.iters=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "107,072 parameters" in again.stdout and "reload_max_abs_diff  0" in again.stdout


def test_bad_settings_exit_non_zero_with_the_key_named(tmp_path):
    unknown = _train(tmp_path, "--config.model.nonexistent=1")
    assert unknown.returncode != 0 and "nonexistent" in unknown.stderr
    bad_value = _train(tmp_path, "--config.model.param_dtype=float16")
    assert bad_value.returncode != 0 and "model.param_dtype must be one of" in bad_value.stderr
    bad_path = _train(tmp_path, "--config.model.hf_path=/no/such/dir")
    assert (
        bad_path.returncode != 0
        and "config.model.hf_path='/no/such/dir': no such directory" in bad_path.stderr
    )
    bad_mesh = _train(tmp_path, "--config.mesh.tensor=3")
    assert bad_mesh.returncode != 0 and "4 devices are not divisible" in bad_mesh.stderr
    assert not os.path.exists(tmp_path / "hf")  # nothing was written by the failed runs


def test_training_config_errors_before_any_work(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "train.py", "--config=configs/base.py", f"--config.workdir={tmp_path}"]
    missing = subprocess.run(
        [*cmd, "--config.data.train_path=/no/such.parquet"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        missing.returncode != 0
        and "config.data.train_path='/no/such.parquet': no such file" in missing.stderr
    )
    bad = subprocess.run(
        [*cmd, "--config.algo.presett=grpo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0 and "presett" in bad.stderr
    assert not os.listdir(tmp_path)  # nothing was written
