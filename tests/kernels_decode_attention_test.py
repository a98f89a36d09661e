"""The Pallas decode kernel against its dense reference over paged caches: both compiled forms under generic
interpretation, the TPU form also under TPU interpret mode; one and two segmentations of the key steps,
query-head groups that are not powers of two, lengths that are not multiples of the page, pages larger than
the GPU form's tile, pages shared between rows and scattered through the pool, a layer other than the first,
and a pool of raw 16-bit words."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnrl_jax.kernels.decode_attention import decode_attention, decode_attention_reference, gather_pages

FORMS = {
    "triton": ("triton", True),
    "tpu": ("tpu", True),
    "tpu-interpret": ("tpu", pltpu.InterpretParams()),
    "per-platform": (None, None),
}


def _paged(rng, b, lengths, k, h, page, layers=2, pages=None, dtype=jnp.float32):
    """Pools [L, A, page, K H] and a table where rows 0 and 1 share their first page and every other
    page sits at a random place in the pool; entries past a row's length point anywhere."""
    mb = -(-max(lengths) // page)
    pages = pages or b * mb + 3
    ids = rng.permutation(pages)[: b * mb].reshape(b, mb)
    ids[1, 0] = ids[0, 0]  # a shared prefix page
    table = np.where(
        np.arange(mb)[None] * page < np.asarray(lengths)[:, None], ids, rng.integers(0, pages, (b, mb))
    )
    shape = (layers, pages, page, k * h)
    kp = jnp.asarray(rng.normal(size=shape), dtype)
    vp = jnp.asarray(rng.normal(size=shape), dtype)
    return kp, vp, jnp.asarray(table, jnp.int32), mb * page


def _staircase(rng, shape, top):
    """Key steps as the sampler writes them: along each row's positions every segmentation's ids never
    decrease and rise by at most one per position (steps of random lengths, up to `top`), with positions of
    -1 (no step) in between."""
    rises = rng.random(shape) < 0.3
    steps = np.minimum(np.cumsum(rises, axis=-1), top)
    return np.where(rng.random(shape) < 0.1, -1, steps)


def test_a_window_of_steps_moves_with_the_tiles():
    """The GPU form keeps a window of 2 x tile step buckets in registers and stores it when a tile's steps
    leave it: a row whose every position is a new step (the most windows) and rows whose steps jump past
    the window at once (after -1 runs) equal the reference."""
    rng = np.random.default_rng(7)
    b, n, k, h, page, c = 3, 4, 2, 16, 16, 200
    lengths = [150, 97, 40]
    q = jnp.asarray(rng.normal(size=(b, n, h)), jnp.float32)
    kp, vp, table, s = _paged(rng, b, lengths, k, h, page)
    steps = np.zeros((b, 2, s), np.int64)
    steps[0, 0] = np.arange(s)  # every position its own step: 150 steps, windows of 32 (tile 16)
    steps[0, 1] = np.arange(s) // 3
    steps[1, 0] = np.where(np.arange(s) < 20, 0, -1)
    steps[1, 0, 80:] = 60  # a jump past the window across a run of -1 as long as the jump
    steps[1, 1] = np.minimum(np.arange(s) // 5, 500)  # ids past C merge into the last bucket
    steps[2] = _staircase(rng, (2, s), 30)
    steps = jnp.asarray(steps)
    lens = jnp.array(lengths)
    want = decode_attention_reference(q, kp, vp, table, lens, steps, c)
    got = decode_attention(q, kp, vp, table, lens, steps, num_steps=c, target="triton", interpret=True)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize("n,k,page", [(4, 2, 16), (12, 2, 8), (7, 1, 4), (6, 2, 128)])
@pytest.mark.parametrize(
    "segmentations,form",
    [(r, f) for r in (0, 1, 2) for f in ("triton", "tpu", "tpu-interpret")] + [(2, "per-platform")],
)
def test_decode_attention_matches_reference(n, k, page, segmentations, form):
    target, interpret = FORMS[form]
    rng = np.random.default_rng(n * page + segmentations)
    b, h, c = 3, 16, 6
    # Pages of 128 are read in pieces of 64 by the GPU form: lengths that end in a second piece and page.
    lengths = [45, 17, 1] if page < 64 else [300, 100, 1]
    q = jnp.asarray(rng.normal(size=(b, n, h)), jnp.float32)
    kp, vp, table, s = _paged(rng, b, lengths, k, h, page)
    shape = (b, s) if segmentations == 0 else (b, segmentations, s)
    steps = jnp.asarray(_staircase(rng, shape, 9))  # ids >= c merge into the last bucket
    lens = jnp.array(lengths)
    try:
        out, lse, mass = decode_attention(
            q, kp, vp, table, lens, steps, 1, num_steps=c, target=target, interpret=interpret
        )
    finally:
        if form == "tpu-interpret":
            pltpu.reset_tpu_interpret_mode_state()
    ref_out, ref_lse, ref_mass = decode_attention_reference(q, kp, vp, table, lens, steps, c, layer=1)
    assert mass.shape == ref_mass.shape == (b, n, *shape[1:-1], c)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)
    np.testing.assert_allclose(mass, ref_mass, atol=1e-5)
    # each row's mass over all steps of one segmentation is the attention to keys with a step: at most 1
    assert float(mass.sum(-1).max()) <= 1.0 + 1e-5


def test_the_reference_reads_each_row_through_its_page_table():
    """gather_pages by hand: row positions in page order, a shared page read by both rows."""
    pool = jnp.arange(1 * 3 * 2 * 1, dtype=jnp.float32).reshape(1, 3, 2, 1)  # pages [0,1] [2,3] [4,5]
    table = jnp.array([[2, 0], [2, 1]])
    got = gather_pages(pool, table)[..., 0, 0]
    np.testing.assert_array_equal(got, [[4, 5, 0, 1], [4, 5, 2, 3]])


@pytest.mark.parametrize("form", ["triton", "tpu"])
def test_a_pool_of_raw_bfloat16_words_equals_the_bfloat16_pool(form):
    """The sampler stores bfloat16 keys as uint16 words; the kernel bitcasts each page on chip."""
    target, interpret = FORMS[form]
    rng = np.random.default_rng(1)
    kp, vp, table, s = _paged(rng, 2, [20, 9], 2, 16, 8, dtype=jnp.bfloat16)
    q = jnp.asarray(rng.normal(size=(2, 4, 16)), jnp.bfloat16)
    lens = jnp.array([20, 9])
    words = [jax.lax.bitcast_convert_type(x, jnp.uint16) for x in (kp, vp)]
    want = decode_attention(q, kp, vp, table, lens, target=target, interpret=interpret)
    got = decode_attention(q, *words, table, lens, target=target, interpret=interpret)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], atol=1e-6)


@pytest.mark.parametrize("form", ["triton", "tpu"])
def test_without_steps_and_bad_shapes(form):
    target, interpret = FORMS[form]
    rng = np.random.default_rng(0)
    kp, vp, table, s = _paged(rng, 2, [20, 3], 2, 16, 4)
    q = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
    lens = jnp.array([20, 3])
    out, lse, mass = decode_attention(q, kp, vp, table, lens, target=target, interpret=interpret)
    ref_out, ref_lse, _ = decode_attention_reference(q, kp, vp, table, lens)
    assert mass is None
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)
    with pytest.raises(
        ValueError, match=r"key_steps must be \[B, S\] or \[B, Y, S\] with \[B, S\]=\(2, 20\)"
    ):
        decode_attention(q, kp, vp, table, lens, jnp.zeros((2, 19), jnp.int32), num_steps=4)
    with pytest.raises(ValueError, match=r"page pools \[L, A, page, K H\]"):
        decode_attention(q, kp[0], vp[0], table, lens)
