"""The shipped paper update stays memory-bounded: the 1.5B train step compiled (never run) at its real
width, vocabulary and 9,216-token rows, at two layers instead of 28, on the suite's 8 fake devices
(`benchmarks/scale_memory.py` gives the full-depth table). What a regression would bring back shows up per
row: full float32 logits are 5.2 GiB per row, an unchunked SwiGLU hidden another 1 GiB."""

from benchmarks.scale_memory import GiB, measure

# Measured at 2 layers on 2026-12-02: 0.85 GiB more per row per device (3 rows vs 1), 6.5 GiB in all.
PER_ROW_BOUND = 1.25 * GiB
TOTAL_BOUND = 8.0 * GiB


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
