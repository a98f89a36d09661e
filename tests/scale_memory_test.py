"""The shipped paper update and sampler stay memory-bounded: the 1.5B train step and sampler call compiled
(never run) at their real width, vocabulary and 9,216-token rows, at two or three layers instead of 28, on
the suite's 8 fake devices (`benchmarks/scale_memory.py` gives the full-depth tables). What a regression
would bring back shows up per row: full float32 logits are 5.2 GiB per row, an unchunked SwiGLU hidden
another 1 GiB.

A fake-CPU proxy, run with `pytest -m benchmark`: the suite's verdict on memory is the real compilers'
(tests/fit_test.py compiles these programs for a v5e-8 and fails if they do not fit; full logits would)."""

import pytest

from benchmarks.scale_memory import GiB, measure

pytestmark = pytest.mark.benchmark

# Measured at 2 layers on 2026-12-02: 0.85 GiB more per row per device (3 rows vs 1), 6.5 GiB in all.
PER_ROW_BOUND = 1.25 * GiB
TOTAL_BOUND = 8.0 * GiB
SAMPLER_WORKING_SET = 4.0 * GiB  # beyond the KV cache; most of it the CPU's float32 copies of the head


def test_the_paper_train_step_needs_a_bounded_memory_per_row():
    one = {m.pass_name: m for m in measure("1p5b", 8, layers=2, overrides={"train.rows_per_device": "1"})}
    three = {m.pass_name: m for m in measure("1p5b", 8, layers=2)}  # the shipped 3 rows per device
    step1, step3 = one["train step"], three["train step"]
    assert (step3.rows_per_device, step3.micro_batches, step3.rows) == (3, 8, 192)
    per_row = (step3.temporaries - step1.temporaries) / 2
    assert per_row < PER_ROW_BOUND, f"{per_row / GiB:.2f} GiB per row"
    assert step3.total < TOTAL_BOUND, f"{step3.total / GiB:.2f} GiB"
    # The reference pass holds no gradients: well under the update.
    assert three["log-probs"].total < step3.total / 2


def test_the_paper_sampler_call_holds_one_kv_cache_and_a_bounded_working_set():
    """The sampler's call for the paper's first batch (384 rows of 1,024 + 8,192 positions) and an
    off-policy call that adds 4 continuations per response (continuously batched), in the slots and KV
    pages that config.sampler.cache_gib holds, compiled at 2 and 3 layers: each extra layer adds its share
    of the page pool and little else (a second copy of the pool, as a bfloat16 scatter done in float32
    or a transpose around a per-shard update made, would double it), and the rest stays a bounded working
    set. 2026-12-06: 2.61 and 2.91 GiB over the pool at 2 layers; a layer adds 1.07x and 1.05x its share.
    """
    from benchmarks.scale_memory import measure_sampler

    for call in ("first batch", "off-policy"):
        two, three = (measure_sampler("1p5b", 8, layers=n, call=call) for n in (2, 3))
        assert two.cache_size == 9216 and two.page_size == 128
        assert two.slots == 384 if call == "first batch" else two.slots > 384
        per_layer_cache = three.kv_cache - two.kv_cache
        assert three.total - two.total < 1.25 * per_layer_cache, call
        assert two.total - two.kv_cache < SAMPLER_WORKING_SET, (
            f"{call}: {(two.total - two.kv_cache) / GiB:.2f} GiB"
        )
