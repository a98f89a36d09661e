"""Compile-only targets (attnrl_jax/targets.py): names as the clouds give them, the compilers' own
capacities, and the extra a missing compiler needs."""

import importlib.util

import pytest

from attnrl_jax import targets as tg

needs_tpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason='pip install -e ".[tpu]"')
needs_cuda = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None, reason='pip install -e ".[cuda]"'
)


@pytest.mark.parametrize(
    "name,platform,chips,topology",
    [
        ("v5e-8", "tpu", 8, "v5e:2x4"),
        ("v5e-4", "tpu", 4, "v5e:2x2"),
        ("v6e-8", "tpu", 8, "v6e:2x4"),
        ("v5p-8", "tpu", 4, "v5:2x2x1"),  # v5p names count TensorCores: two per chip
        ("v5p-16", "tpu", 8, "v5:2x2x2"),
        ("v5p-32", "tpu", 16, "v5:2x2x4"),
        ("h100-8", "cuda", 8, "1x1x8"),
        ("H200-16", "cuda", 16, "2x1x8"),
    ],
)
def test_names_as_the_clouds_give_them(name, platform, chips, topology):
    t = tg.parse(name)
    assert (t.platform, t.chips, t.topology) == (platform, chips, topology)


@pytest.mark.parametrize("name", ["v5e", "tpu-8", "v5p-7", "v5e-6", "h100-12", "a100-8"])
def test_an_unknown_target_is_refused_with_what_is_expected(name):
    with pytest.raises(ValueError, match=r"v5e-N|two per chip|power of two|multiple of 8"):
        tg.parse(name)


def test_a_missing_compiler_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(tg.MissingCompiler, match=r'pip install -e "\.\[tpu\]"'):
        tg.require("tpu")
    with pytest.raises(tg.MissingCompiler, match=r'pip install -e "\.\[cuda\]"'):
        tg.require("cuda")


@needs_tpu
def test_tpu_capacities_are_what_libtpu_allows():
    """libtpu states its HBM when it refuses a program: v5e 15.75 GiB, v5p 95.74 GiB (of 16 and 96)."""
    assert tg.capacity(tg.parse("v5e-8")) == int(15.75 * 2**30)
    assert tg.capacity(tg.parse("v5p-8")) == int(95.74 * 2**30)
    assert len(tg.devices(tg.parse("v5e-8"))) == 8
    assert tg.device_kind(tg.parse("v5e-8")) == "TPU v5 lite"


@needs_cuda
def test_gpu_capacity_is_the_target_configs_memory_times_the_clients_share():
    t = tg.parse("h100-8")
    assert tg.capacity(t) == int(84978434048 * tg.GPU_MEMORY_FRACTION)
    assert tg.device_kind(t) == "NVIDIA H100 80GB HBM3"
    assert len(tg.devices(tg.parse("h200-8"))) == 8
