"""On 8 forced CPU devices (see conftest.py): a 2x4 mesh shards parameters as the rules table says, and
the sharded forward equals the unsharded one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from attnrl_jax.mesh import MeshConfig, Sharder, make_mesh
from attnrl_jax.model import ModelConfig, forward, init_params, init_sharded_params, param_axes
from attnrl_jax.model.hf_io import load_checkpoint
from helpers import padded_batch, tiny_hf_model

# 8 query heads, 2 KV heads: the tensor axis of 4 splits query heads but must leave KV heads replicated.
CFG = ModelConfig.tiny(vocab_size=128, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=2)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "conftest.py forces 8 CPU devices"
    return make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))


def test_mesh_from_config(mesh):
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert dict(make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 6 devices, but 8 are available"):
        make_mesh(MeshConfig(data=1, fsdp=3, tensor=2))
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)


def test_parameters_are_sharded_as_the_rules_say(mesh):
    params = init_sharded_params(CFG, jax.random.key(0), Sharder(mesh))
    expected = {
        "embed": P("tensor", "fsdp"),
        "lm_head": P("tensor", "fsdp"),
        "final_norm": P(None),
    }
    layers = {
        "q": P(None, "fsdp", "tensor", None),
        "q_bias": P(None, "tensor", None),
        "k": P(None, "fsdp", None, None),  # 2 KV heads cannot be split 4 ways: replicated
        "k_bias": P(None, None, None),
        "o": P(None, "tensor", None, "fsdp"),
        "gate": P(None, "fsdp", "tensor"),
        "down": P(None, "tensor", "fsdp"),
        "attn_norm": P(None, None),
    }
    for name, spec in expected.items():
        assert params[name].sharding.spec == spec, name
    for name, spec in layers.items():
        assert params["layers"][name].sharding.spec == spec, name
    # Each device really holds only its block.
    q = params["layers"]["q"]
    assert {s.data.shape for s in q.addressable_shards} == {(CFG.num_layers, 32, 2, CFG.head_dim)}
    gate = params["layers"]["gate"]
    assert {s.data.shape for s in gate.addressable_shards} == {(CFG.num_layers, 32, 32)}


@pytest.mark.slow
def test_sharded_forward_equals_unsharded(mesh):
    params = init_params(CFG, jax.random.key(1))
    sharder = Sharder(mesh)
    shardings = sharder.tree_shardings(param_axes(CFG), params)
    sharded_params = jax.device_put(params, shardings)
    tokens, mask = padded_batch(CFG.vocab_size, [16, 9, 12, 5], 16)
    ref = forward(params, jnp.asarray(tokens), cfg=CFG, segment_ids=jnp.asarray(mask))

    batch_sharding = sharder.sharding(("batch", "length"), tokens.shape)
    fn = jax.jit(lambda p, t, m: forward(p, t, cfg=CFG, segment_ids=m, sharder=sharder))
    out = fn(sharded_params, jax.device_put(tokens, batch_sharding), jax.device_put(mask, batch_sharding))
    assert out.sharding.spec == P("fsdp", None, "tensor")  # logits carry the activation rules too
    assert float(jnp.abs(out - ref).max()) <= 1e-5


def test_checkpoint_loads_straight_onto_the_mesh(tmp_path, mesh):
    tiny_hf_model(vocab=128, hidden=64, heads=8, kv_heads=2).save_pretrained(tmp_path)
    sharder = Sharder(mesh)
    cfg, sharded, _ = load_checkpoint(str(tmp_path), sharder)
    _, single, _ = load_checkpoint(str(tmp_path))
    assert sharded["layers"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert sharded["embed"].sharding.spec == P("tensor", "fsdp")
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_mesh_is_a_no_op():
    sharder = Sharder()
    x = jnp.ones((4, 3))
    assert sharder.constrain(x, ("batch", "act_embed")) is x
    assert sharder.spec(("batch", "embed")) == P(None, None)
    with pytest.raises(KeyError, match="logical axis 'nonsense' has no rule"):
        sharder.spec(("nonsense",))


def test_a_batch_that_does_not_divide_the_mesh_is_reported(mesh, caplog):
    sharder = Sharder(mesh)
    with caplog.at_level("WARNING", logger="attnrl_jax.mesh"):
        assert sharder.spec(("batch", None), (5, 4)) == P(None, None)  # 5 rows on an fsdp axis of 2
        sharder.spec(("batch", None), (5, 4))  # said once per shape
        assert sharder.spec(("batch", None), (8, 4)) == P("fsdp", None)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "5 rows" in said[0] and "'fsdp' (size 2)" in said[0], said


def _pallas_calls(jaxpr):
    """Every pallas_call equation of a jaxpr, inside nested jaxprs (scan, shard_map, cond) too."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                inner = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    yield from _pallas_calls(inner)


def _kernel_operand_shapes(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return {str(e.params["name"]): [tuple(v.aval.shape) for v in e.invars] for e in _pallas_calls(jaxpr)}


@pytest.mark.slow
@pytest.mark.parametrize("tensor", [2, 4], ids=["heads-split", "kv-heads-indivisible"])
def test_kernels_run_on_each_devices_shards(tensor):
    """attention_impl="pallas" under a mesh: the flash, FCI and decode kernels see each device's rows (and
    heads, where the tensor axis divides the KV heads too), never the all-gathered batch, and the
    results equal the unsharded XLA path's."""
    from attnrl_jax.model import forward_with_fci
    from attnrl_jax.model.cached import forward_cached
    from attnrl_jax.model.kv_cache import init_cache

    mesh = make_mesh(MeshConfig(data=1, fsdp=8 // tensor, tensor=tensor))
    sharder = Sharder(mesh)
    rows = 8 // mesh.shape["fsdp"]  # of the batch of 8
    q_heads = 8 // tensor if tensor == 2 else 8  # 2 KV heads do not split 4 ways: heads stay whole
    cfg = CFG.replace(attention_impl="pallas")
    params = init_params(CFG, jax.random.key(1))
    placed = jax.device_put(params, sharder.tree_shardings(param_axes(CFG), params))
    b = 8
    tokens, mask = padded_batch(CFG.vocab_size, [16, 9, 12, 5, 16, 16, 3, 10], 16)
    steps = np.where(mask > 0, np.arange(16)[None] // 3, -1)
    put = lambda x: jax.device_put(jnp.asarray(x), sharder.sharding(("batch", "length"), x.shape))  # noqa: E731

    def fci_fn(p, t, s, c):
        return forward_with_fci(p, t, s, jnp.full((b,), -1), cfg=c, num_steps=8, sharder=sharder)

    got = jax.jit(functools.partial(fci_fn, c=cfg))(placed, put(tokens), put(steps))
    ref = forward_with_fci(
        params, jnp.asarray(tokens), jnp.asarray(steps), jnp.full((b,), -1), cfg=CFG, num_steps=8
    )
    np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-5)
    np.testing.assert_allclose(got["fci"], ref["fci"], atol=1e-6)
    shapes = _kernel_operand_shapes(functools.partial(fci_fn, c=cfg), placed, put(tokens), put(steps))
    assert shapes["flash_attention_fwd"][0][:2] == (rows, q_heads)  # head-major q [B, N, T, H] per device
    assert shapes["fci_column_sums"][0][:2] == (rows, q_heads)

    # One decode step with two segmentations of the key steps.
    cache = init_cache(CFG, b, 20, sharder, page=4)  # 5 pages of 4 positions per row, split like the rows
    _, cache, _ = forward_cached(params, jnp.asarray(tokens), cache, cfg=CFG, valid=jnp.asarray(mask > 0))
    key_steps = jnp.asarray(np.stack([np.arange(20) // 4, np.arange(20) // 5])[None].repeat(b, 0))
    new = jnp.asarray(tokens[:, :1])

    def decode(p, c, cfg):
        return forward_cached(p, new, c, cfg=cfg, key_steps=key_steps, num_steps=6, sharder=sharder)

    h, _, mass = jax.jit(functools.partial(decode, cfg=cfg))(placed, cache)
    h_ref, _, mass_ref = forward_cached(params, new, cache, cfg=CFG, key_steps=key_steps, num_steps=6)
    np.testing.assert_allclose(h, h_ref, atol=1e-5)
    np.testing.assert_allclose(mass, mass_ref, atol=1e-6)
    shapes = _kernel_operand_shapes(functools.partial(decode, cfg=cfg), placed, cache)
    # The GPU form (what the CPU interprets) takes the layer, lengths and page table, then q [B, K, G, H].
    assert shapes["decode_attention"][3][0] == rows and shapes["decode_attention"][1][0] == rows
