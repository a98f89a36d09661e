"""End to end: the model's one-pass FCI equals the section 5.2 formula applied to the attention maps that
transformers' PyTorch Qwen2 returns (eager attention, output_attentions=True) for the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from attnrl_jax.kernels.fci import fci_reference
from attnrl_jax.model import forward, forward_with_fci
from attnrl_jax.model.hf_io import load_checkpoint
from helpers import tiny_hf_model

NUM_STEPS = 16


def _row(rng, prompt_len, step_lens, think_at, total, vocab):
    ids = [0] * prompt_len + [c for c, n in enumerate(step_lens, 1) for _ in range(n)]
    n = len(ids)
    tokens = np.zeros(total, np.int64)
    tokens[:n] = rng.integers(0, vocab, n)
    return tokens, np.array(ids + [-1] * (total - n)), think_at


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("fci_model")
    model = tiny_hf_model(vocab=96, hidden=64, heads=4, kv_heads=2, layers=3, seed=11)
    model.save_pretrained(path)
    rng = np.random.default_rng(0)
    total = 48
    rows = [
        _row(rng, 6, [3, 5, 1, 4, 2, 6, 3, 2, 4], -1, total, 96),  # no </think>
        _row(rng, 4, [2, 2, 7, 1, 1, 3, 5, 2, 3, 1, 2], 8, total, 96),  # </think> in step 8
        _row(rng, 9, [4, 3, 2], -1, total, 96),  # fewer than Delta + 1 steps
    ]
    return model, str(path), rows


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_model_fci_equals_formula_on_transformers_attention(setup, impl):
    model, path, rows = setup
    cfg, params, _ = load_checkpoint(path, attention_impl=impl)
    tokens = jnp.asarray(np.stack([r[0] for r in rows]))
    steps = jnp.asarray(np.stack([r[1] for r in rows]))
    think = jnp.asarray([r[2] for r in rows])
    targets = jnp.roll(tokens, -1, axis=1)
    out = forward_with_fci(
        params, tokens, steps, think, cfg=cfg, num_steps=NUM_STEPS, targets=targets, per_head=True
    )
    assert out["fci"].shape == (3, NUM_STEPS) and out["fci_per_head"].shape == (3, 3, 4, NUM_STEPS)
    for b, (tok, ids, kappa) in enumerate(rows):
        n = int((ids >= 0).sum())
        with torch.no_grad():
            res = model(input_ids=torch.tensor(tok[None, :n]), output_attentions=True)
        attn = np.stack([a[0].numpy() for a in res.attentions])  # [L, H, n, n]
        ref, per_head = fci_reference(attn, ids[:n], kappa)
        got = np.asarray(out["fci"][b])
        np.testing.assert_allclose(got[: len(ref)], ref, atol=1e-5)
        assert not got[len(ref) :].any()
        np.testing.assert_allclose(np.asarray(out["fci_per_head"][:, b, :, : len(ref)]), per_head, atol=1e-5)
    assert float(jnp.abs(out["fci"][0]).max()) > 1e-3  # a real signal, not all zeros
    # The log-probs of the same pass are the plain forward's.
    logits = forward(params, tokens, cfg=cfg, segment_ids=(steps >= 0).astype(jnp.int32))
    want = jnp.take_along_axis(jax_log_softmax(logits), targets[..., None], -1)[..., 0]
    valid = np.asarray(steps) >= 0
    np.testing.assert_allclose(np.asarray(out["log_probs"])[valid], np.asarray(want)[valid], atol=1e-5)


def jax_log_softmax(x):
    import jax

    return jax.nn.log_softmax(x, axis=-1)


def test_step_attention_columns_are_the_forward_fci_sums():
    """`step_attention` (the report's step x step map) holds what FCI sums: its column sums from Delta
    steps below the diagonal are `forward_with_fci`'s per-layer, per-head sums; its rows are averages of
    attention probabilities, so a row weighted by its key steps' sizes sums to 1."""
    from attnrl_jax.model import ModelConfig, init_params
    from attnrl_jax.model.forward import step_attention

    cfg = ModelConfig.tiny(vocab_size=64, num_layers=2, param_dtype="float32", dtype="float32")
    params = jax.tree.map(lambda x: 4 * x, init_params(cfg, jax.random.key(0)))
    ids = np.concatenate([np.zeros(6), np.repeat(np.arange(1, 9), 4), -np.ones(2)]).astype(np.int32)
    tokens = np.random.default_rng(0).integers(0, 64, (1, len(ids))).astype(np.int32)
    m = np.asarray(step_attention(params, jnp.asarray(tokens), jnp.asarray(ids[None]), cfg=cfg))
    assert m.shape == (cfg.num_layers, 1, cfg.num_heads, 9, 9)
    out = forward_with_fci(
        params, jnp.asarray(tokens), jnp.asarray(ids[None]), jnp.asarray([-1]), cfg=cfg, num_steps=12,
        delta=4, per_head=True,
    )  # fmt: skip
    sums = np.stack([m[..., c + 4 :, c].sum(-1) for c in range(9)], -1)
    np.testing.assert_allclose(sums, np.asarray(out["fci_per_head"])[..., :9], atol=1e-6)
    sizes = np.bincount(ids[ids >= 0])  # a row weighted by its key steps' sizes is a query's whole mass
    np.testing.assert_allclose((m * sizes).sum(-1), 1.0, atol=1e-5)
    assert np.allclose(np.triu(m, 1), 0.0)  # no step attends to a later one
