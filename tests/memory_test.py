"""What a run keeps on each chip and the room it leaves the sampler (attnrl_jax/memory.py), by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from attnrl_jax.memory import (
    CPU_CACHE_GIB,
    GiB,
    cache_gib,
    check_memory_settings,
    resident_bytes,
    shard_bytes,
    to_device,
    to_host,
)
from attnrl_jax.mesh import MeshConfig, Sharder, make_mesh


def test_resident_bytes_count_each_array_at_its_largest_shard():
    sharder = Sharder(make_mesh(MeshConfig(data=1, fsdp=8, tensor=1)))
    split = jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=sharder.sharding(("batch", None), (16, 4)))
    whole = jax.ShapeDtypeStruct((3, 5), jnp.bfloat16, sharding=sharder.sharding((None, None), (3, 5)))
    assert shard_bytes(split) == 2 * 4 * 4  # 16 rows over 8 devices
    assert shard_bytes(whole) == 3 * 5 * 2  # replicated: every device holds it all
    assert resident_bytes({"a": split, "b": [whole]}, None) == 32 + 30
    live = jax.device_put(np.zeros((16, 4), np.float32), split.sharding)
    assert resident_bytes(live) == 32


def test_the_cache_budget_is_a_fraction_of_what_the_resident_state_leaves():
    # 16 GiB chip, 4 GiB resident, 0.8 of the 12 left
    assert cache_gib(None, 16 * GiB, 4 * GiB, 0.8) == pytest.approx(9.6)
    assert cache_gib(7.5, 16 * GiB, 4 * GiB, 0.8) == 7.5  # a fixed budget stands
    assert cache_gib(0.0, 16 * GiB, 4 * GiB, 0.8) == 0.0  # no limit
    assert cache_gib(None, None, 4 * GiB, 0.8) == CPU_CACHE_GIB  # a CPU states no capacity
    with pytest.raises(ValueError, match=r"keeps 17.00 GiB per chip resident.*holds 16.00 GiB"):
        cache_gib(None, 16 * GiB, 17 * GiB, 0.8)


def test_memory_settings_are_checked_with_the_key_named():
    check_memory_settings(ConfigDict({"cache_gib": None, "memory_fraction": 0.8}), "sampler")
    with pytest.raises(ValueError, match=r"config.sampler.cache_gib must be unset.*got -1"):
        check_memory_settings(ConfigDict({"cache_gib": -1.0, "memory_fraction": 0.8}), "sampler")
    with pytest.raises(ValueError, match=r"config.eval.memory_fraction must be in \(0, 1\], got 1.5"):
        check_memory_settings(ConfigDict({"cache_gib": None, "memory_fraction": 1.5}), "eval")


def test_the_train_state_goes_to_host_memory_and_back_unchanged():
    sharder = Sharder(make_mesh(MeshConfig(data=1, fsdp=8, tensor=1)))
    x = jax.device_put(
        np.arange(64, dtype=np.float32).reshape(16, 4), sharder.sharding(("batch", None), (16, 4))
    )
    tree = {"params": x, "step": jnp.int32(3)}
    host = to_host(tree)
    assert host["params"].sharding.memory_kind == "pinned_host"
    back = to_device(host)
    assert back["params"].sharding.memory_kind == "device"
    assert back["params"].sharding.spec == x.sharding.spec
    np.testing.assert_array_equal(back["params"], x)
    assert int(back["step"]) == 3
