"""End to end: data whose ground truth sits under a key the loader does not read ("answer"), so the
gsm8k reward scores every sample 0, every group is zero-variance and filtered, and no batch can
ever form. The run must stop with the counts and the likely cause instead of waiting forever.

Slow (a full pipeline start for a run that trains nothing); the same path runs in the default
suite without an engine in test_rollout_faults.py."""

import json
import time

import pytest
from pipeline_runs import compose_job

from verl_async.data.tasks import generate_task


@pytest.mark.slow
def test_all_filtered_data_fails_in_bounded_time_with_counts_and_cause(tmp_path, ray_session):
    from verl_async.main import run
    from verl_async.pipeline.driver import PipelineError

    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": r.messages, "answer": "7"})
                              for r in generate_task("digits", 32, seed=2)) + "\n")
    job = compose_job(tmp_path / "out", f"data.train_files=[{rows}]", "data.reward_fn=gsm8k",
                      "pipeline.batch_groups=4", "pipeline.max_unusable_groups_in_a_row=24", "pipeline.total_steps=3")
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as err:
        run(job)
    message = str(err.value)
    assert time.monotonic() - t0 < 400
    assert "last 24 groups in a row were unusable (filtered 24)" in message, message
    assert "the same reward (0 x24)" in message and "24 of these prompts had an empty ground truth" in message
    assert "no checkpoint was written yet" in message
