"""End to end, the runs that must stop (and say how to go on) rather than hang:

- data whose ground truth sits under a key the loader does not read ("answer"): the gsm8k reward
  scores every sample 0, every group is zero-variance and filtered, no batch can ever form;
- the trainer's process is killed with SIGKILL mid-run: the run ends with the dead rank named and
  the checkpoint to resume from, and its shutdown does not wait on anything stuck.

Slow (each is a full pipeline start); the same paths run in the default suite without an engine
in test_rollout_faults.py and test_trainer_faults.py."""

import json
import os
import signal
import threading
import time

import psutil
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


def _kill_trainer_after_step(out, step: int, killed: dict) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if metrics.exists() and sum(1 for _ in metrics.open()) > step:
            for proc in psutil.Process().children(recursive=True):
                try:
                    if "TrainerWorker" in " ".join(proc.cmdline()):
                        os.kill(proc.pid, signal.SIGKILL)
                        killed["at"] = time.monotonic()
                        return
                except psutil.Error:
                    continue
        time.sleep(0.2)


@pytest.mark.slow
def test_a_killed_trainer_ends_the_run_with_the_checkpoint_to_resume_from(tmp_path, ray_session):
    from verl_async.main import run
    from verl_async.pipeline.driver import PipelineError

    out = tmp_path / "out"
    job = compose_job(out, "pipeline.total_steps=8", "pipeline.batch_groups=4", "trainer.checkpoint_every_steps=2",
                      "logging.plots=false")
    killed: dict = {}
    threading.Thread(target=_kill_trainer_after_step, args=(out, 3, killed), daemon=True).start()
    with pytest.raises(PipelineError) as err:
        run(job)
    ended = time.monotonic()
    message = str(err.value)
    assert killed and ended - killed["at"] < 60, "the run did not end promptly after the trainer died"
    assert "trainer rank 0 died" in message, message
    assert "checkpoints/step_000002 (step 2) with resume=true" in message or \
        "checkpoints/step_000004 (step 4) with resume=true" in message, message
