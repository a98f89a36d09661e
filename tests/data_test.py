"""verl parquet reading (real eval files when present, files made here otherwise) and the iterator."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attnrl_jax.data import IteratorState, Problem, PromptIterator, read_verl_parquet, write_verl_parquet

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "eval", "aime24_1.parquet")


def _problems(n):
    return [
        Problem(i, "toy", ({"role": "user", "content": f"What is {i} + {i}? " + "x " * (i % 7)},), str(2 * i))
        for i in range(n)
    ]


def test_round_trip(tmp_path):
    path = str(tmp_path / "train.parquet")  # string ground truths, as in training files
    write_verl_parquet(path, _problems(5))
    assert read_verl_parquet(path) == _problems(5)
    lists = [Problem(9, "toy", ({"role": "user", "content": "q"},), ("1", "one"))]  # lists, as in eval files
    write_verl_parquet(str(tmp_path / "eval.parquet"), lists)
    assert read_verl_parquet(str(tmp_path / "eval.parquet")) == lists


@pytest.mark.skipif(not os.path.exists(SHARED), reason="the shared benchmark files are not on this machine")
def test_reads_the_real_eval_format():
    problems = read_verl_parquet(SHARED)
    assert len(problems) == 30 and problems[0].ground_truth == ("204",)
    assert problems[0].question.endswith("within \\boxed{}.")


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet: no such parquet file"):
        read_verl_parquet(str(tmp_path / "nope.parquet"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="junk.parquet: not a readable parquet file"):
        read_verl_parquet(str(tmp_path / "junk.parquet"))
    pq.write_table(pa.Table.from_pylist([{"question": "q"}]), tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match=r"cols.parquet: missing column\(s\) \['prompt', 'reward_model'\]"):
        read_verl_parquet(str(tmp_path / "cols.parquet"))
    pq.write_table(
        pa.Table.from_pylist(
            [{"prompt": [{"role": "user", "content": "q"}], "reward_model": {"style": "rule"}}]
        ),
        tmp_path / "gt.parquet",
    )
    with pytest.raises(ValueError, match="row 0: reward_model.ground_truth is missing"):
        read_verl_parquet(str(tmp_path / "gt.parquet"))
    for good, bad, says in (
        ("7", "  ", "a ground truth is empty"),
        (["7"], [], "the list of ground truths is"),
    ):
        rows = [
            {"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": g}}
            for g in (good, good, bad)
        ]
        pq.write_table(
            pa.Table.from_pylist(rows),
            tmp_path / "empty.parquet",
        )
        with pytest.raises(ValueError, match=f"empty.parquet: row 2: reward_model.ground_truth: {says}"):
            read_verl_parquet(str(tmp_path / "empty.parquet"))


def test_iterator_resumes_exactly_and_reshuffles_each_epoch():
    full = PromptIterator(_problems(7), seed=3)
    straight = [p.index for p in full.take(4) + full.take(6) + full.take(5)]
    first = PromptIterator(_problems(7), seed=3)
    head = [p.index for p in first.take(4) + first.take(6)]
    saved = IteratorState.from_dict(first.state.to_dict())
    resumed = PromptIterator(_problems(7), seed=3)
    resumed.restore(saved)
    assert head + [p.index for p in resumed.take(5)] == straight
    assert sorted(straight[:7]) == list(range(7))  # each epoch is a permutation
    assert straight[:7] != straight[7:14]  # reshuffled
    assert saved == IteratorState(3, 1, 3)


def test_over_long_prompts_are_dropped_and_counted():
    it = PromptIterator(_problems(10), prompt_len=lambda p: len(p.question.split()), max_prompt_len=7)
    assert it.dropped > 0 and all(len(p.question.split()) <= 7 for p in it.take(20))
    with pytest.raises(ValueError, match="no problem left to train on"):
        PromptIterator(_problems(3), prompt_len=lambda p: 100, max_prompt_len=7)
