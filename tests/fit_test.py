"""The compile-only fit check (attnrl_jax/fit.py) and the model's entry points with the real compilers.

The full-depth tables come from `python train.py --config=configs/attnrl_1p5b.py --compile_only=v5e-8`
(benchmarks/RESULTS.md, minutes per target); here every program of the shipped configs compiles at two
layers (a check of the programs' structure, sharding and kernels on the target, not of their memory), and
the command's verdicts and errors are those a user gets."""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import pytest

from attnrl_jax import fit
from benchmarks import kernel_compile as cc

# Integration: whole jobs, subprocesses or real-compiler builds (make test-fast leaves it out).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
compilers = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None or importlib.util.find_spec("jax_cuda12_plugin") is None,
    reason='the real compilers: pip install -e ".[compilers]" (make test installs them)',
)
# The Pallas kernels each entry point holds when compiled for a TPU.
TPU_KERNELS = {
    "FCI forward": {"flash_attention_fwd", "fci_column_sums"},
    "loss gradient": {"flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"},
    "sampler call": {"flash_attention_fwd", "decode_attention"},  # prefill, then decode
}


def _cli(*args, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="")  # the command sets what it needs
    env.pop("XLA_FLAGS", None)  # no fake CPU devices: the target's are compile-only
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@compilers
@pytest.mark.parametrize("target", ["v5e-1", "v5p-2", "h100-1"])
def test_the_model_entry_points_compile_for_each_target(target):
    """FCI forward, the loss gradient and a sampler call at 2 layers of the 1.5B model, L = 8192, one chip;
    on TPU each holds its Pallas kernels (no fallback to XLA attention)."""
    for name, (fn, args) in fit.entry_points(8192, layers=2).items():
        lowered = cc.lower_for(fn, args, target)
        if target.startswith("v5"):
            kernels = set(re.findall(r'kernel_name\s*=\s*"(\w+)"', lowered.as_text()))
            assert TPU_KERNELS[name.split(" (")[0]] <= kernels, (name, kernels)
        cc.compile_for(fn, args, target)


@compilers
def test_the_shipped_training_run_compiles_for_a_v5e_8_in_one_command():
    """`train.py --compile_only` on the shipped 1.5B config (two layers): all four programs compile on a
    sharded v5e-8 with the train state on the host while sampling, and the command says so."""
    run = _cli("train.py", "--config=configs/attnrl_1p5b.py", "--compile_only=v5e-8", "--compile_layers=2")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    for program in (
        "sampler: first batch",
        "sampler: off-policy call, largest batch",
        "reference pass, one mini-batch",
        "train step, one mini-batch",
    ):
        assert re.search(rf"\| {re.escape(program)} \| [\d.]+ GiB = ", out), program
    assert "8 x TPU v5 lite, 15.75 GiB per chip" in out
    assert "on the host while sampling" in out
    assert "verdict: every program compiles for v5e-8 and fits" in out


@compilers
def test_an_on_policy_gpu_run_compiles_its_own_programs(tmp_path):
    """TreeRL (on-policy: initial responses and continuations apart) on 8 H100s, in process."""
    from configs import treerl_1p5b

    lines = []
    status = fit.check(treerl_1p5b.get_config(), "h100-8", "train", layers=2, out=lines.append)
    text = "\n".join(lines)
    assert status == 0, text
    assert "sampler: initial responses, largest batch" in text
    assert "sampler: continuations, largest batch" in text
    assert "8 x NVIDIA H100 80GB HBM3" in text


@compilers
def test_a_program_that_does_not_fit_is_named_and_the_command_exits_1():
    """The evaluation call with no cache limit (every row of 64 prompts x 32 samples at 34k positions at
    once) cannot fit a v5e chip: the verdict names it and the command exits 1."""
    run = _cli("eval.py", "--compile_only=v5e-8", "--compile_layers=2", "--config.eval.cache_gib=0")
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"verdict: evaluation call does not (compile|fit) on v5e-8", run.stdout)


def test_bad_targets_and_configs_get_one_error_line():
    run = _cli("train.py", "--config=configs/attnrl_1p5b.py", "--compile_only=v9x-8")
    assert run.returncode == 2 and "error: unknown compile target 'v9x-8'" in run.stderr
    assert "Traceback" not in run.stderr
    run = _cli("train.py", "--config=configs/task.py", "--compile_only=v5e-8")
    assert run.returncode != 0 and "--compile_only checks training configs" in run.stderr


def test_a_missing_compiler_names_the_extra(monkeypatch):
    from attnrl_jax import targets

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "libtpu" else real(n))
    targets.devices.cache_clear()
    try:
        from configs import attnrl_1p5b

        lines = []
        monkeypatch.setattr(sys, "stderr", type("E", (), {"write": lines.append, "flush": lambda: None})())
        assert fit.cli(attnrl_1p5b.get_config(), "v5e-8", "train", 2) == 2
    finally:
        targets.devices.cache_clear()
    assert re.search(r'error: compiling for TPU needs libtpu .* pip install -e "\.\[tpu\]"', "".join(lines))


def test_the_run_config_takes_the_preset_without_the_checkpoint():
    from configs import attnrl_7b

    c = fit.run_config(attnrl_7b.get_config(), layers=3)
    assert c.model.hf_path == "" and c.model.preset == "r1_distill_qwen_7b" and c.model.num_layers == 3
    bare = attnrl_7b.get_config()
    with bare.unlocked():
        bare.model.preset = ""
    with pytest.raises(ValueError, match="config.model.hf_path=.* is not on this machine"):
        fit.run_config(bare)
    assert jax.device_count() == 8  # nothing here touched the suite's own devices


@compilers
def test_the_tpu_sampler_holds_one_layout_of_the_kv_pool():
    """The cause of the 3x TPU sampler: the pool in two tiled layouts with whole-pool copies between them
    around every token's write (`[.., K, P, page, H]`: three copies at two layers). libtpu's compiled
    first-batch call (v5e-8, two layers) copies no pool-sized array."""
    from attnrl_jax import targets
    from attnrl_jax.mesh import MeshConfig, Sharder, make_mesh
    from configs import attnrl_1p5b

    target = targets.parse("v5e-8")
    c = fit.run_config(attnrl_1p5b.get_config(), layers=2)
    sharder = Sharder(make_mesh(MeshConfig(**c.mesh), list(targets.devices(target))))
    program = fit.train_programs(c, sharder, targets.capacity(target))[0][0]
    assert program.name == "sampler: first batch"
    with jax.set_mesh(sharder.mesh), jax.default_matmul_precision(None):
        compiled = program.fn(*program.args).compile()
    text = compiled.as_text()
    pool_row = 2 * 128  # KV heads x head dim: a pool's last axis
    assert re.search(rf"u16\[[\d,]+,128,{pool_row}\]", text), "no pool in the program?"
    copies = re.findall(rf"= u16\[[\d,]+,128,{pool_row}\]\{{[^}}]*\}} copy\(", text)
    assert not copies, copies
