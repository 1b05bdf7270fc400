"""Rows load from JSONL and parquet; bad rows are counted skips; the stream resumes exactly; rewards."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from verl_async.data.rows import LoadReport, load_rows, write_jsonl
from verl_async.data.source import DataPosition, PromptSource
from verl_async.data.tasks import generate_task
from verl_async.rewards import resolve_reward
from verl_async.rewards.math import extract_final_number


def test_generated_task_is_deterministic():
    a, b = generate_task("digits", 10, seed=3), generate_task("digits", 10, seed=3)
    assert [r.messages for r in a] == [r.messages for r in b]
    assert len({r.prompt_id for r in a}) == 10


def test_jsonl_and_parquet_rows_and_counted_skips(tmp_path):
    rows = generate_task("digits", 5, seed=0)
    write_jsonl(rows, tmp_path / "d.jsonl")
    with open(tmp_path / "d.jsonl", "a") as f:
        f.write('{"prompt": [], "ground_truth": "1"}\n')  # malformed: empty prompt
    report = LoadReport()
    loaded = load_rows([str(tmp_path / "d.jsonl")], report)
    assert [r.prompt_id for r in loaded] == [r.prompt_id for r in rows]
    assert report.skipped == {"missing or empty `prompt` messages": 1}

    table = pa.Table.from_pylist([{"prompt": [{"role": "user", "content": "2+2?"}],
                                   "reward_model": {"ground_truth": "4"}, "data_source": "gsm8k"}])
    pq.write_table(table, tmp_path / "d.parquet")
    (row,) = load_rows([str(tmp_path / "d.parquet")])
    assert row.ground_truth == "4" and row.messages[0]["content"] == "2+2?"


def test_missing_file_fails_with_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="fix the path"):
        load_rows([str(tmp_path / "nope.jsonl")])


def test_prompt_source_resumes_without_rereading():
    rows = generate_task("digits", 7, seed=0)
    full = PromptSource(rows, shuffle=True, seed=1)
    seen = [full.next().prompt_id for _ in range(17)]  # crosses two epoch boundaries
    first = PromptSource(rows, shuffle=True, seed=1)
    head = [first.next().prompt_id for _ in range(9)]
    resumed = PromptSource(rows, shuffle=True, seed=1, position=DataPosition(**vars(first.position)))
    assert head + [resumed.next().prompt_id for _ in range(8)] == seen


def test_rewards():
    digits = resolve_reward("digits")
    assert digits("", "3", {}) == 0.0
    assert digits("12 34", "7", {}) == 1.0
    assert digits("12", "12", {}) == 1.5
    assert digits("ab12", "", {}) == 0.5
    gsm = resolve_reward("gsm8k")
    assert gsm("so the answer is 1,234.", "#### 1234", {}) == 1.0
    assert gsm("\\boxed{72}", "72", {}) == 1.0 and gsm("71", "72", {}) == 0.0
    assert extract_final_number("no number") is None
    assert resolve_reward("verl_async.rewards.digits:digits_reward") is digits
    with pytest.raises(ValueError, match="unknown"):
        resolve_reward("nope")
