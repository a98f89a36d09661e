"""Properties of the JAX Qwen2 forward: causality, packing, positions, remat, log-probs, compile cost."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnrl_jax.model import ModelConfig, default_positions, forward, init_params, token_log_probs
from attnrl_jax.model.attention import attention, attention_mask

CFG = ModelConfig.tiny(vocab_size=64)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _tokens(shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


def test_causal_future_tokens_do_not_change_past_logits(params):
    a = _tokens((1, 12))
    b = a.at[0, 7:].set((a[0, 7:] + 5) % CFG.vocab_size)
    la, lb = forward(params, a, cfg=CFG), forward(params, b, cfg=CFG)
    np.testing.assert_allclose(la[0, :7], lb[0, :7], atol=1e-6)
    assert np.abs(np.asarray(la[0, 7:] - lb[0, 7:])).max() > 1e-3


def test_packed_row_equals_separate_rows(params):
    """Two sequences packed in one row (segment ids 1, 2) give the logits of each alone."""
    x, y = _tokens((1, 5), 1), _tokens((1, 7), 2)
    packed = jnp.concatenate([x, y], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 7])
    np.testing.assert_array_equal(default_positions(seg), [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    out = forward(params, packed, cfg=CFG, segment_ids=seg)
    np.testing.assert_allclose(out[0, :5], forward(params, x, cfg=CFG)[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:], forward(params, y, cfg=CFG)[0], atol=1e-5)


def test_default_positions_right_and_left_padding():
    seg = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(default_positions(seg), [[0, 1, 2, 0, 0], [0, 0, 0, 1, 2]])


def test_left_padding_with_explicit_mask(params):
    x = _tokens((1, 6), 3)
    left = jnp.concatenate([jnp.zeros((1, 3), x.dtype), x], axis=1)
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_allclose(
        forward(params, left, cfg=CFG, segment_ids=mask)[0, 3:], forward(params, x, cfg=CFG)[0], atol=1e-5
    )


def test_attention_xla_matches_dense_per_head_reference():
    """GQA attention without copying K/V equals a per-query-head loop over explicit softmax maps."""
    b, t, n, k, h = 2, 6, 4, 2, 8
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (b, t, n, h))
    kk = jax.random.normal(ks[1], (b, t, k, h))
    v = jax.random.normal(ks[2], (b, t, k, h))
    seg = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 2, 2, 2, 2]])
    out = attention(q, kk, v, seg, seg)
    mask = np.asarray(attention_mask(seg, seg))
    for bi in range(b):
        for head in range(n):
            s = np.asarray(q[bi, :, head] @ kk[bi, :, head // (n // k)].T) / np.sqrt(h)
            s = np.where(mask[bi], s, -np.inf)
            with np.errstate(invalid="ignore"):
                p = np.exp(s - s.max(-1, keepdims=True))
                p = np.nan_to_num(p / p.sum(-1, keepdims=True))
            np.testing.assert_allclose(
                out[bi, :, head], p @ np.asarray(v[bi, :, head // (n // k)]), atol=1e-5
            )
    assert not np.asarray(out[0, 4:]).any()  # padding queries see nothing and output zeros


def test_token_log_probs_is_gathered_log_softmax(params):
    x = _tokens((2, 9), 4)
    targets = jnp.roll(x, -1, axis=1)
    lp = token_log_probs(params, x, targets, cfg=CFG)
    full = jax.nn.log_softmax(forward(params, x, cfg=CFG), axis=-1)
    np.testing.assert_allclose(lp, jnp.take_along_axis(full, targets[..., None], -1)[..., 0], atol=1e-6)
    assert lp.dtype == jnp.float32 and float(lp.max()) <= 0


def _full_log_probs_and_entropy(params, x, targets, cfg, temperature):
    """The plain formula the chunked head must equal: full float32 logits, log-softmax, gather."""
    logits = forward(params, x, cfg=cfg) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [3, 4, 64], ids=["ragged-chunks", "even-chunks", "one-chunk"])
def test_chunked_log_probs_and_entropy_equal_the_full_logits_formula(params, chunk):
    """Values and gradients (through the target log-probs and the entropy) of the chunked head equal those
    of full logits, for chunks that do and do not divide the 9-token rows, at a sampling temperature."""
    from attnrl_jax.model.forward import hidden_states, token_log_probs_from_hidden

    cfg = CFG.replace(logits_chunk=chunk, mlp_chunk=chunk)
    x = _tokens((2, 9), 6)
    targets = jnp.roll(x, -1, axis=1)
    w = jnp.linspace(-1.0, 1.0, 18).reshape(2, 9)  # weights make every position's gradient distinct

    def chunked(p):
        h = hidden_states(p, x, cfg=cfg)
        lp, ent = token_log_probs_from_hidden(p, h, targets, cfg=cfg, temperature=0.7, with_entropy=True)
        return jnp.sum(w * lp) + jnp.sum(w * ent), (lp, ent)

    def full(p):
        lp, ent = _full_log_probs_and_entropy(p, x, targets, CFG, 0.7)
        return jnp.sum(w * lp) + jnp.sum(w * ent), (lp, ent)

    (_, (lp, ent)), g = jax.value_and_grad(chunked, has_aux=True)(params)
    (_, (lp_ref, ent_ref)), g_ref = jax.value_and_grad(full, has_aux=True)(params)
    np.testing.assert_allclose(lp, lp_ref, atol=1e-5)
    np.testing.assert_allclose(ent, ent_ref, atol=1e-5)
    assert float(ent.min()) > 0
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_chunked_head_holds_one_chunk_of_logits():
    """The compiled gradient of 64 chunks keeps about one chunk's float32 logits, not the row's: its
    temporaries stay far below the [rows, length, vocab] array the full formula needs."""
    from attnrl_jax.model.forward import token_log_probs_from_hidden

    cfg = CFG.replace(vocab_size=4096, logits_chunk=64)
    b, t, d = 2, 4096, cfg.hidden_size
    full_logits = b * t * cfg.vocab_size * 4
    h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    targets = jax.ShapeDtypeStruct((b, t), jnp.int32)
    head = jax.ShapeDtypeStruct((cfg.vocab_size, d), jnp.float32)

    def loss(w, h, tg):
        return token_log_probs_from_hidden({"lm_head": w}, h, tg, cfg=cfg)[0].sum()

    mem = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(head, h, targets).compile().memory_analysis()
    assert mem.temp_size_in_bytes < full_logits / 8, (mem.temp_size_in_bytes, full_logits)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["none", "dots"])
def test_remat_policies_give_the_same_gradients(params, policy):
    x = _tokens((2, 8), 5)

    def loss(p, cfg):
        return -token_log_probs(p, x, jnp.roll(x, -1, 1), cfg=cfg).mean()

    g_full = jax.grad(loss)(params, CFG)
    g_other = jax.grad(loss)(params, CFG.replace(remat=policy))
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_other)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_compiled_program_does_not_grow_with_depth():
    """The layers run under one scan: the lowered program of 8 layers is about as big as that of 2."""
    x = jnp.zeros((1, 8), jnp.int32)

    def size(layers):
        cfg = CFG.replace(num_layers=layers)
        abstract = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
        return len(jax.jit(lambda p, t: forward(p, t, cfg=cfg)).lower(abstract, x).as_text())

    assert size(8) < 1.05 * size(2)


def test_unknown_attention_impl_is_refused():
    q = jnp.zeros((1, 2, 2, 4))
    seg = jnp.ones((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attention(q, q, q, seg, seg, impl="flash")
