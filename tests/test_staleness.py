"""Pure pipeline logic: admission control, the hard staleness bound, the ledger, batches, the queue."""

import asyncio

import pytest

from verl_async.pipeline.batch import build_train_batch, split_by_staleness
from verl_async.pipeline.ledger import Ledger
from verl_async.pipeline.queue import SampleQueue
from verl_async.pipeline.staleness import (
    admission_capacity,
    committed_groups,
    version_lag,
    within_bound,
)
from verl_async.types import FinishReason, Generation, Group, Sample


def _group(pid: str, rewards: list[float], versions: list[int], reason=FinishReason.STOP) -> Group:
    samples = [Sample(pid, pid, Generation(f"{pid}/{i}", [1, 2], [3, 4, 5][: len(versions)],
                                           [-0.1] * len(versions), versions, reason), r)
               for i, r in enumerate(rewards)]
    return Group(pid, samples)


def test_admission_capacity_formula():
    # B=4, s=1: at engine version 0 up to (0+1+1)*4 = 8 groups may be committed.
    assert admission_capacity(0, 0, 4, 1) == 8
    assert admission_capacity(0, 8, 4, 1) == 0
    assert admission_capacity(1, 8, 4, 1) == 4  # a sync frees one batch of slots
    assert admission_capacity(0, 20, 4, 1) == 0  # never negative
    # s=0 is synchronous: one batch per version.
    assert admission_capacity(3, 12, 4, 0) == 4 and admission_capacity(3, 16, 4, 0) == 0


def test_admission_bounds_lag_in_a_simulated_run():
    """Simulate FIFO consumption with admission control: no trained group exceeds the bound."""
    B, s, steps = 3, 2, 30
    engine_version, started, queue, max_lag = 0, [], [], 0
    for step in range(steps):
        while admission_capacity(engine_version, len(started), B, s) > 0:
            started.append(engine_version)
            queue.append(engine_version)
        batch, queue = queue[:B], queue[B:]
        max_lag = max([max_lag] + [version_lag(step, v) for v in batch])
        engine_version = step + 1  # sync after every step
    assert max_lag <= s


def test_admission_after_resume_counts_groups_trained_before_the_checkpoint():
    # B=8, s=0, resumed at step 12 with 8 groups put back into the queue: no room for more until
    # the trainer takes a batch or stale groups are dropped.
    committed = committed_groups(resumed_step=12, batch_groups=8, read=8, freed=0)
    assert committed == 104 and admission_capacity(12, committed, 8, 0) == 0
    assert admission_capacity(12, committed_groups(12, 8, read=8, freed=3), 8, 0) == 3  # 3 dropped as stale
    assert admission_capacity(13, committed, 8, 0) == 8  # after the next step's sync
    assert committed_groups(0, 8, read=5, freed=2) == 3  # a fresh run


def test_within_bound_and_split():
    assert within_bound(5, 4, 1) and not within_bound(5, 3, 1) and within_bound(0, 0, 0)
    fresh, stale = split_by_staleness([_group("a", [1, 0], [3, 4]), _group("b", [1, 0], [2, 4])], 4, 1)
    assert [g.prompt_id for g in fresh] == ["a"] and [g.prompt_id for g in stale] == ["b"]


def test_group_min_version_is_oldest_token():
    assert _group("a", [1, 0], [2, 2, 3]).min_policy_version == 2


def test_build_train_batch_advantages_masks_and_lags():
    groups = [_group("a", [1.0, 0.0], [4, 5]), _group("b", [0.5, 0.5], [5, 5], FinishReason.LENGTH)]
    batch, stats = build_train_batch(groups, step=5, trainer_version=5, advantage="drgrpo", mask_truncated=True)
    assert [r.advantage for r in batch.rows] == [0.5, -0.5, 0.0, 0.0]
    assert batch.rows[0].loss_mask == [1, 1] and batch.rows[2].loss_mask == [0, 0]
    assert stats.max_lag == 1 and stats.mean_lag == pytest.approx(0.25) and stats.truncated_frac == 0.5
    with pytest.raises(ValueError, match="must not reach training"):
        build_train_batch([_group("c", [1, 0], [5], FinishReason.ABORT)], 5, 5, "grpo")


def test_ledger_balance():
    ledger = Ledger(read=10, trained=4, filtered=1, rejected=1, stale_dropped=1, failed=0, in_flight=2, queued=1)
    assert ledger.balance() == 0 and ledger.metrics()["ledger/balance"] == 0.0
    assert Ledger(read=3, trained=1).balance() == 2


def test_queue_applies_bound_and_times_out():
    async def scenario():
        q = SampleQueue(capacity=4)
        await q.put(_group("old", [1, 0], [0]))
        await q.put(_group("new", [1, 0], [2]))
        got = await q.get_batch(2, trainer_version=3, max_staleness=1, timeout_s=5)
        assert [g.prompt_id for g in got.groups] == ["new"] and got.stale_dropped == 1
        assert got.wait_s < 1  # returns at once after a drop empties the queue: the slots must be freed
        assert q.counts() == {"received": 2, "taken": 1, "stale_dropped": 1, "queued": 0}
        # a waiting consumer is woken by a producer
        consumer = asyncio.create_task(q.get_batch(1, 3, 1, timeout_s=5))
        await asyncio.sleep(0.05)
        await q.put(_group("late", [1, 0], [3]))
        assert [g.prompt_id for g in (await consumer).groups] == ["late"]

    asyncio.run(scenario())


def test_queue_wait_for_room_times_out_while_full():
    async def scenario():
        q = SampleQueue(capacity=1)
        assert await q.wait_for_room(0.01)
        await q.put(_group("a", [1, 0], [0]))
        assert not await q.wait_for_room(0.05)  # full: False after the timeout, nothing blocks for good
        waiting = asyncio.create_task(q.wait_for_room(5))
        await asyncio.sleep(0.05)
        await q.get_batch(1, 0, 0, timeout_s=1)
        assert await asyncio.wait_for(waiting, 1)

    asyncio.run(scenario())


def test_queue_put_waits_while_full():
    async def scenario():
        q = SampleQueue(capacity=1)
        await q.put(_group("a", [1, 0], [0]))
        blocked = asyncio.create_task(q.put(_group("b", [1, 0], [0])))
        await asyncio.sleep(0.05)
        assert not blocked.done() and q.depth() == 1
        await q.get_batch(1, 0, 0, timeout_s=1)
        await asyncio.wait_for(blocked, 1)
        assert q.depth() == 1

    asyncio.run(scenario())
