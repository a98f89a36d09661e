"""Step segmentation (docs/algorithm.md section 4) on a toy vocabulary and on the real Qwen BPE vocabulary."""

import numpy as np
import pytest

from attnrl_jax.algo import SeparatorTable, segment

# id:      0    1     2        3     4          5           6    7
VOCAB = ["a", "b", ".\n\n", "\n", "\n\n\n", "</think>", "c", "<eos>"]
TABLE = SeparatorTable.from_strings(VOCAB)


def test_separator_table_from_strings():
    np.testing.assert_array_equal(TABLE.double_newline, [0, 0, 1, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(TABLE.newline, [0, 0, 1, 1, 1, 0, 0, 0])
    assert TABLE.think_end_id == 5


def test_steps_end_right_after_their_separator():
    # a b .\n\n | c a \n\n\n | </think> c .\n\n | a
    steps = segment(np.array([0, 1, 2, 6, 0, 4, 5, 6, 2, 0]), TABLE, prompt_len=2)
    np.testing.assert_array_equal(steps.bounds, [0, 3, 6, 9, 10])
    assert steps.num_steps == 4
    np.testing.assert_array_equal(steps.starts, [0, 3, 6, 9])
    np.testing.assert_array_equal(steps.lengths, [3, 3, 3, 1])
    assert steps.think_step == 3  # </think> is token 6, inside [6, 9)
    np.testing.assert_array_equal(steps.absolute_bounds(), [0, 2, 5, 8, 11, 12])
    np.testing.assert_array_equal(steps.token_step_ids(14), [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, -1, -1])


def test_last_separator_as_final_token_adds_no_empty_step():
    steps = segment(np.array([0, 2, 1, 2]), TABLE)
    np.testing.assert_array_equal(steps.bounds, [0, 2, 4])
    assert steps.think_step == -1


def test_fallbacks_single_newline_then_every_token():
    np.testing.assert_array_equal(segment(np.array([0, 3, 1, 3, 6]), TABLE).bounds, [0, 2, 4, 5])
    np.testing.assert_array_equal(segment(np.array([0, 1, 6]), TABLE).bounds, [0, 1, 2, 3])
    assert segment(np.array([], np.int64), TABLE).num_steps == 0


def test_last_think_end_wins():
    steps = segment(np.array([5, 2, 0, 2, 5, 1]), TABLE)
    np.testing.assert_array_equal(steps.bounds, [0, 2, 4, 6])
    assert steps.think_step == 3


def test_out_of_range_token_is_refused():
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 8\)"):
        segment(np.array([0, 9]), TABLE)


@pytest.fixture(scope="module")
def qwen(qwen_tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=qwen_tokenizer_dir + "/tokenizer.json")
    return tok, SeparatorTable.from_tokenizer(tok)


def test_real_qwen_vocabulary_merged_separators(qwen):
    tok, table = qwen
    assert len(table.double_newline) == len(tok) > 150_000
    for text in [".\n\n", "\n\n\n", ":\n\n", "\n\n"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == 1, (text, ids)  # a merged BPE token ...
        assert table.double_newline[ids[0]], text  # ... that is a step separator
    single = tok.encode("\n", add_special_tokens=False)
    assert len(single) == 1 and table.newline[single[0]] and not table.double_newline[single[0]]
    assert table.think_end_id == tok.encode("</think>", add_special_tokens=False)[-1]


def test_real_qwen_boundaries_reproduce_the_text(qwen):
    tok, table = qwen
    text = (
        "Let x be the number.\n\nThen 2x + 3 = 11, so 2x = 8:\n\nx = 4.\n\n\n"
        "Check: 2*4 + 3 = 11. </think>\n\nThe answer is \\boxed{4}."
    )
    ids = np.array(tok.encode(text, add_special_tokens=False))
    steps = segment(ids, table)
    pieces = [tok.decode(ids[a:b]) for a, b in zip(steps.bounds[:-1], steps.bounds[1:])]
    assert "".join(pieces) == text
    assert pieces[:3] == ["Let x be the number.\n\n", "Then 2x + 3 = 11, so 2x = 8:\n\n", "x = 4.\n\n\n"]
    assert all("\n\n" in p for p in pieces[:-1])
    assert "</think>" in pieces[steps.think_step - 1]
