"""Bad input is a clear error or a counted skip, never a crash, a hang or a NaN step (pure, no Ray):
malformed rows, reward errors, order-independent zero-variance filtering, the starvation watch,
the checks that run before Ray and vLLM start, and the sampling settings the trainer cannot match."""

import json
import math
import subprocess
import sys
import time

import pytest

from verl_async.algorithms.advantages import is_zero_variance
from verl_async.config import ConfigError, DataConfig, JobConfig, RolloutConfig
from verl_async.data.rows import LoadReport, load_rows, write_jsonl
from verl_async.data.tasks import generate_task
from verl_async.pipeline.starvation import StarvationWatch
from verl_async.rewards.scoring import score_group

BAD_ROWS = {
    '{"prompt": ["hello", "world"], "ground_truth": "1"}': "`prompt` holds a str, not chat messages",
    '{"prompt": "hi", "extra_info": "oops"}': "`extra_info` is a str, not an object",
    '{"prompt": "hi", "images": "a.png"}': "`images` is a str, not a list",
    '{"prompt": [{"role": "user"}]}': "lacks a string `role` or a string/list `content`",
    '{"prompt": [{"role": "user", "content": ["a"]}]}': "non-dict parts",
    '[1, 2, 3]': "the record is a list, not an object",
    '{"prompt": "What is 1 and': "malformed JSON line",
}


def test_each_bad_row_is_a_counted_skip_with_its_reason(tmp_path):
    rows = generate_task("digits", 3, seed=0)
    path = tmp_path / "rows.jsonl"
    write_jsonl(rows, str(path))
    with path.open("a") as f:
        f.write("\n".join(BAD_ROWS) + "\n")
    report = LoadReport()
    loaded = load_rows([str(path)], report)
    assert [r.prompt_id for r in loaded] == [r.prompt_id for r in rows]
    assert sum(report.skipped.values()) == len(BAD_ROWS)
    for reason in BAD_ROWS.values():
        assert any(reason in k for k in report.skipped), (reason, report.skipped)
    assert load_rows([str(path)], LoadReport(), limit=2) == loaded[:2]  # the preflight's sample


def test_reward_errors_are_dropped_or_zeroed_and_described():
    def reward(text, gt, extra):
        return {"nan": math.nan, "inf": math.inf, "word": "high", "ok": 0.5}.get(text) or 1 / 0

    texts = ["ok", "nan", "inf", "word", "boom"]
    dropped = score_group(reward, texts, "", {}, "drop")
    assert dropped.rewards == [0.5, None, None, None, None] and dropped.kept == [0.5]
    assert dropped.errors == ["returned nan", "returned inf", "raised ValueError: could not convert string "
                              "to float: 'high'", "raised ZeroDivisionError: division by zero"]
    assert score_group(reward, texts, "", {}, "zero").rewards == [0.5, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="drop, zero"):
        score_group(reward, texts, "", {}, "ignore")


def test_zero_variance_does_not_depend_on_order_and_refuses_nan():
    assert is_zero_variance([1.0, 1.0, 1.0]) and not is_zero_variance([1.0, 0.0])
    for rewards in ([math.nan, 1.0], [1.0, math.nan], [1.0, 1.0, math.inf]):
        with pytest.raises(ValueError, match="not all finite"):
            is_zero_variance(rewards)  # max/min of a list with NaN depends on where the NaN is


def test_starvation_watch_counts_a_streak_and_names_the_cause():
    watch = StarvationWatch(limit=4)
    for _ in range(3):
        watch.unusable("filtered", reward=0.0, empty_ground_truth=True, now=0.0)
    watch.usable()  # one trainable group resets the streak
    assert watch.verdict() is None
    for kind in ("filtered", "filtered", "rejected"):
        watch.unusable(kind, reward=0.0 if kind == "filtered" else None, empty_ground_truth=True, now=10.0)
    assert watch.verdict(now=20.0) is None
    watch.unusable("filtered", reward=0.0, empty_ground_truth=True, now=25.0)
    message = watch.verdict(now=40.0)
    assert "last 4 groups in a row were unusable (filtered 3, rejected 1) over 30 s" in message
    assert "the same reward (0 x3)" in message and "4 of these prompts had an empty ground truth" in message
    errors = StarvationWatch(limit=2)
    errors.unusable("reward_errors")
    errors.unusable("reward_errors")
    assert "raised or returned NaN/inf" in errors.verdict()


def _job(tmp_path, **data) -> JobConfig:
    return JobConfig(data=DataConfig(**data), output_dir=str(tmp_path / "out"))


def test_preflight_reports_every_problem_at_once_before_ray(tmp_path):
    from verl_async.preflight import preflight

    (tmp_path / "bad.jsonl").write_text('{"prompt": ["a", "b"]}\n[1]\n')
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    job = _job(tmp_path, reward_fn="no_such_module:score", train_files=[
        str(tmp_path / "bad.jsonl"), str(tmp_path / "missing.jsonl"), str(tmp_path / "rows.csv")])
    job.model.path = str(tmp_path / "model")
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        preflight(job)
    assert time.monotonic() - t0 < 10
    message = str(err.value)
    for part in ("data.reward_fn='no_such_module:score' cannot be imported",
                 "model.path:", "has no tokenizer",
                 "bad.jsonl: none of its first 256 rows is usable", "`prompt` holds a str",
                 "missing.jsonl does not exist", "rows.csv has an unknown suffix"):
        assert part in message, (part, message)


def test_preflight_needs_neither_ray_nor_vllm_nor_torch():
    code = ("import sys; from verl_async.config import JobConfig, DataConfig; from verl_async.preflight import "
            "preflight\ntry:\n    preflight(JobConfig(data=DataConfig(reward_fn='nope:x')))\nexcept Exception as e:\n"
            "    print(type(e).__name__)\nprint(sorted(m for m in ('ray', 'vllm', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["ConfigError", "[]"]


def test_preflight_passes_a_good_job(tmp_path):
    from verl_async.preflight import preflight

    write_jsonl(generate_task("digits", 3, seed=0), str(tmp_path / "rows.jsonl"))
    preflight(_job(tmp_path, train_files=[str(tmp_path / "rows.jsonl")]))
    preflight(_job(tmp_path, generated_task="digits"))
    with pytest.raises(ConfigError, match="data.generated_task: 'sums' is unknown"):
        preflight(_job(tmp_path, generated_task="sums"))


@pytest.mark.parametrize("kwargs, key", [({"top_p": 0.9}, "rollout.top_p"), ({"top_k": 20}, "rollout.top_k")])
def test_truncated_sampling_is_refused_with_the_reason(kwargs, key):
    with pytest.raises(ConfigError, match=f"{key}=.*trainer's log-probs cover the full vocabulary"):
        RolloutConfig(**kwargs)
    assert RolloutConfig(top_p=1.0, top_k=0).top_k == 0


def test_config_keys_of_this_issue_are_validated():
    from verl_async.config import ClusterConfig, PipelineConfig, TrainerConfig

    with pytest.raises(ConfigError, match="data.reward_error"):
        DataConfig(reward_error="ignore")
    with pytest.raises(ConfigError, match="pipeline.max_unusable_groups_in_a_row"):
        PipelineConfig(max_unusable_groups_in_a_row=0)
    with pytest.raises(ConfigError, match="trainer.max_nonfinite_skips"):
        TrainerConfig(max_nonfinite_skips=0)
    with pytest.raises(ConfigError, match="rollout.max_restarts"):
        RolloutConfig(max_restarts=-1)
    with pytest.raises(ConfigError, match="cluster.rollout_resources"):
        ClusterConfig(rollout_resources={"GPU": 1.0})
    assert json.dumps(ClusterConfig(trainer_resources={"trainer_node": 1.0}).trainer_resources)
