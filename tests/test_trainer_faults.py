"""The trainer's fault paths: non-finite updates are skipped and counted, N in a row stop the run;
a trainer rank that dies fails the step at once and shutdown does not hang on the survivors; the
run's failure message names the checkpoint to resume from."""

import asyncio
import time

import pytest
import ray
import torch
from test_train_step import free_port, random_rows, snapshot

from verl_async.config.algorithm import AlgorithmConfig
from verl_async.config.model import ModelConfig
from verl_async.config.trainer import TrainerConfig
from verl_async.training.guards import NonFiniteGuard, NonFiniteUpdateError
from verl_async.training.worker import TrainerWorker
from verl_async.types import TrainBatch


def test_guard_skips_counts_and_stops_after_n_in_a_row():
    guard = NonFiniteGuard(max_in_a_row=2)
    assert guard.allow_update(0, 1.5)
    assert not guard.allow_update(1, float("nan"))
    assert guard.allow_update(2, 0.3) and guard.in_a_row == 0  # a finite update ends the run of skips
    assert not guard.allow_update(3, float("inf"))
    with pytest.raises(NonFiniteUpdateError, match="2 optimizer updates in a row.*trainer.max_nonfinite_skips"):
        guard.allow_update(4, float("nan"))
    assert guard.skips == 3


def test_nonfinite_updates_leave_the_weights_and_count_the_step(tiny_path):
    """A NaN advantage makes the loss and every gradient NaN: the update is skipped (weights unchanged),
    the step and policy_version still advance, train/nonfinite_skips counts it; two in a row stop."""
    trainer = TrainerConfig(lr=1e-3, micro_batch_max_tokens=96, max_nonfinite_skips=2)
    worker = TrainerWorker(0, 1, tiny_path, ModelConfig(path=tiny_path), trainer,
                           AlgorithmConfig(policy_loss="ppo", is_correction="none"), total_steps=10, device="cpu")
    worker.setup("127.0.0.1", free_port())
    try:
        def nan_rows(seed):
            rows = random_rows(4, seed)
            rows[0].advantage = float("nan")
            return rows

        before = snapshot(worker)
        m = worker.train_step(TrainBatch(nan_rows(0), step=0, policy_version=0)).metrics
        assert m["train/nonfinite_skips"] == 1 and worker.state() == {"step": 1, "policy_version": 1}
        assert all(torch.equal(before[k], v) for k, v in snapshot(worker).items())
        m = worker.train_step(TrainBatch(random_rows(4, 1), step=1, policy_version=1)).metrics
        assert m["train/nonfinite_skips"] == 1 and not all(torch.equal(before[k], v) for k, v in snapshot(worker).items())
        worker.train_step(TrainBatch(nan_rows(2), step=2, policy_version=2))
        with pytest.raises(NonFiniteUpdateError, match="step 3: 2 optimizer updates in a row"):
            worker.train_step(TrainBatch(nan_rows(3), step=3, policy_version=3))
    finally:
        worker.shutdown()


def test_a_dead_trainer_rank_fails_the_step_at_once_and_shutdown_does_not_block(tiny_path, ray_session):
    from verl_async.training.group import SHUTDOWN_GRACE_S, TrainerGroup, TrainerRankDied

    trainer = TrainerConfig(num_workers=2, lr=1e-3, micro_batch_max_tokens=96, fsdp=False)
    group = TrainerGroup(tiny_path, ModelConfig(path=tiny_path), trainer, AlgorithmConfig(), total_steps=5,
                         device="cpu")
    try:
        ray.kill(group.workers[1])  # rank 0 will wait in the gradient all-reduce for a peer that is gone
        t0 = time.monotonic()
        with pytest.raises(TrainerRankDied, match="trainer rank 1 died"):
            asyncio.run(group.train_step_async(TrainBatch(random_rows(4, 0), step=0, policy_version=0)))
        assert time.monotonic() - t0 < 30
    finally:
        t0 = time.monotonic()
        group.shutdown()
        assert time.monotonic() - t0 < SHUTDOWN_GRACE_S + 10


def test_failure_message_names_the_checkpoint_to_resume_from(tmp_path):
    from verl_async.pipeline.driver import failure_message

    assert "no checkpoint was written yet" in failure_message(RuntimeError("x"), str(tmp_path), 0)
    for step in (2, 4):
        d = tmp_path / "checkpoints" / f"step_{step:06d}"
        d.mkdir(parents=True)
        (d / "COMPLETE").write_text(str(step))
    (tmp_path / "checkpoints" / "step_000006").mkdir()  # half-written: never resumed
    message = failure_message(RuntimeError("trainer rank 0 died"), str(tmp_path), 2)
    assert "RuntimeError: trainer rank 0 died" in message
    assert "step_000004 (step 4) with resume=true" in message and "every 2 steps" in message
