"""The rollouter's bad-input and fault paths, on the real Rollouter, SampleQueue, manager and tiny
tokenizer with stand-in servers (no engine: these test the pipeline's own accounting):

- every group unusable -> the rollout stops in bounded time with counts and the likely cause, and
  a trainer waiting for a batch gets that error instead of waiting forever;
- NaN / raising rewards -> counted reward errors, the samples dropped (or scored 0), never trained;
- prompts over data.max_prompt_length -> rejected and counted before any server sees them;
- a server that dies mid-group -> the group is requeued and regenerated once a replacement is added.
"""

import asyncio
import math
import time

import pytest

from verl_async.config import AlgorithmConfig, DataConfig, PipelineConfig, RolloutConfig
from verl_async.data.rows import write_jsonl
from verl_async.data.tasks import generate_task
from verl_async.rollout.server import ServerInfo
from verl_async.types import FinishReason, Generation


class _Remote:
    """An actor method stand-in: `.remote(...)` is the coroutine function."""

    def __init__(self, fn):
        self.remote = fn


class _FakeServer:
    """Answers request `<group>/<i>` with the text answers[i % len(answers)] + EOS; can die."""

    def __init__(self, tokenizer, answers=(" 12",), dies_after: int | None = None):
        self.tokenizer, self.answers, self.dies_after = tokenizer, answers, dies_after
        self.requests: list[str] = []
        self.alive = True
        self.generate, self.stats, self.health = _Remote(self._generate), _Remote(self._stats), _Remote(self._health)

    async def _generate(self, request_id, prompt, budget, sampling):
        if self.dies_after is not None and len(self.requests) >= self.dies_after:
            self.alive = False
        if not self.alive:
            raise ConnectionError("the actor died")
        self.requests.append(request_id)
        await asyncio.sleep(0.01)
        text = self.answers[int(request_id.rsplit("/", 1)[1]) % len(self.answers)]
        ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        return Generation(request_id, prompt.prompt_ids, ids, [-1.0] * len(ids), [0] * len(ids), FinishReason.STOP)

    async def _stats(self):
        return {}

    async def _health(self):
        return self.alive


class _LocalQueue:
    """The real SampleQueue, called the way the rollouter calls the actor (`method.remote(...)`)."""

    def __init__(self, capacity: int = 64):
        from verl_async.pipeline.queue import SampleQueue

        self.queue = SampleQueue(capacity=capacity)
        for name in ("put", "wait_for_room", "get_batch"):
            setattr(self, name, _Remote(getattr(self.queue, name)))


def _rollouter(tiny_path, server, queue, data: DataConfig, limit: int = 256, drop_zero_variance: bool = True):
    from verl_async.pipeline.rollouter import Rollouter

    return Rollouter([server], [ServerInfo(0, 256, 1, "fake")], tiny_path, RolloutConfig(n=4, response_length=8),
                     data, PipelineConfig(batch_groups=2, max_staleness=0, max_unusable_groups_in_a_row=limit),
                     AlgorithmConfig(drop_zero_variance_groups=drop_zero_variance), queue)


def test_all_filtered_stops_the_rollout_with_counts_and_cause_and_the_trainer_gets_it(tiny_path):
    """The model answers the same to everything: every group is zero-variance and filtered."""
    from verl_async.pipeline.driver import PipelineError, take_batch

    async def scenario():
        queue = _LocalQueue()
        r = _rollouter(tiny_path, _FakeServer(_tokenizer(tiny_path)), queue, DataConfig(), limit=6)
        t0 = time.monotonic()
        await r.start()
        while r.health() is None and time.monotonic() - t0 < 20:
            await asyncio.sleep(0.05)
        stopped_after = time.monotonic() - t0
        roles = _Roles(queue, r)
        with pytest.raises(PipelineError) as err:
            await take_batch(roles, _NoSupervisor(), 2, 0, 0, {"queue/stale_dropped": 0.0})
        return r, stopped_after, str(err.value)

    r, stopped_after, message = asyncio.run(scenario())
    assert stopped_after < 10
    assert r.counts.filtered >= 6 and r.counts.delivered == 0
    assert "StarvationError" in message and "last 6 groups in a row were unusable (filtered 6)" in message
    assert "the same reward (" in message and "drop_zero_variance_groups=false" in message
    assert r._task.done()  # the producer stopped reading prompts


def test_reward_errors_are_counted_and_never_reach_a_group(tiny_path, tmp_path):
    """nan_sometimes: NaN for a response whose length is a multiple of 5, a raise for the row asking for it."""
    rows = generate_task("digits", 4, seed=1)
    rows[0].ground_truth = "raise"
    write_jsonl(rows, str(tmp_path / "rows.jsonl"))
    answers = (" 12", " 1234", " ab", " 9 x")
    tok = _tokenizer(tiny_path)
    texts = [tok.decode(tok.encode(a, add_special_tokens=False) + [tok.eos_token_id], skip_special_tokens=True)
             for a in answers]
    assert [len(t) % 5 == 0 for t in texts] == [False, True, False, False]  # one NaN per group

    async def scenario(policy):
        queue = _LocalQueue()
        data = DataConfig(train_files=[str(tmp_path / "rows.jsonl")], shuffle=False,
                          reward_fn="faulty_rewards:nan_sometimes", reward_error=policy)
        r = _rollouter(tiny_path, _FakeServer(_tokenizer(tiny_path), answers), queue, data)
        for i in range(4):
            await r._rollout_group(r.source.next(), f"g{i}")
        return r, queue.queue.snapshot(), await r.pop_metrics()

    r, groups, metrics = asyncio.run(scenario("drop"))
    assert metrics["rollout/reward_errors"] == 4 + 3  # the raising row's 4 samples, one NaN in each other group
    assert r.counts.failed == 1 and len(groups) == 3  # the raising row has no sample left
    assert all(len(g.samples) == 3 and all(math.isfinite(s.reward) for s in g.samples) for g in groups)
    assert math.isfinite(metrics["rollout/reward_mean"])
    r, groups, metrics = asyncio.run(scenario("zero"))
    assert metrics["rollout/reward_errors"] == 7 and r.counts.failed == 1  # the raising row: all 0, no signal
    assert all(len(g.samples) == 4 and g.rewards[1] == 0.0 for g in groups)


def test_prompts_over_max_prompt_length_are_rejected_before_any_server(tiny_path, tmp_path):
    rows = generate_task("digits", 2, seed=1)
    rows[0].messages[0]["content"] = " ".join(["apples"] * 80)
    write_jsonl(rows, str(tmp_path / "rows.jsonl"))
    server = _FakeServer(_tokenizer(tiny_path), answers=(" 1", " a"))

    async def scenario():
        data = DataConfig(train_files=[str(tmp_path / "rows.jsonl")], shuffle=False, max_prompt_length=40)
        r = _rollouter(tiny_path, server, _LocalQueue(), data)
        for i in range(2):
            await r._rollout_group(r.source.next(), f"g{i}")
        return r, await r.pop_metrics()

    r, metrics = asyncio.run(scenario())
    assert metrics["data/prompts_too_long"] == 1 and r.counts.rejected == 1 and r.counts.delivered == 1
    assert all(req.startswith("g1/") for req in server.requests)


def test_a_group_on_a_dying_server_is_requeued_and_regenerated_on_its_replacement(tiny_path):
    tok = _tokenizer(tiny_path)
    dying = _FakeServer(tok, answers=(" 1", " a"), dies_after=2)  # dies in the middle of the first group

    async def scenario():
        queue = _LocalQueue()
        r = _rollouter(tiny_path, dying, queue, DataConfig(num_generated_prompts=4, shuffle=False))
        first = r.source.next()
        r.counts.read += 1
        r.counts.in_flight += 1
        await r._rollout_group(first, "g1")
        lost = await r.lost_servers()
        assert r.counts.requeued == 1 and r.pending_rows == [first] and lost == [0]
        await r.remove_server(0)
        await r.add_server(0, _FakeServer(tok, answers=(" 1", " a")), ServerInfo(0, 256, 1, "fake"))
        await r.start()  # the producer takes the requeued row first
        got = await queue.get_batch.remote(2, 0, 0, 10.0)
        await r.stop()
        return r, got.groups, first

    r, groups, first = asyncio.run(scenario())
    assert groups[0].prompt_id == first.prompt_id
    assert r.counts.read == r.counts.requeued + r.counts.delivered + r.counts.in_flight + r.counts.filtered


def test_stop_during_a_delivery_counts_the_group_once(tiny_path):
    """stop() while a group's put into the queue is under way: it is counted delivered (and queued),
    never also in flight, and no group lands in the queue after the counts were read."""
    tok = _tokenizer(tiny_path)

    async def scenario():
        queue = _LocalQueue()
        real_put, entered = queue.queue.put, asyncio.Event()

        async def slow_put(group):
            entered.set()
            await asyncio.sleep(0.2)
            return await real_put(group)

        queue.put = _Remote(slow_put)
        r = _rollouter(tiny_path, _FakeServer(tok, answers=(" 1", " a")), queue,
                       DataConfig(num_generated_prompts=8, shuffle=False))
        await r.start()
        await entered.wait()  # the first delivery is inside queue.put
        final = await r.stop()
        await asyncio.sleep(0.5)  # any delivery still running finishes now
        return final, queue.queue.counts()

    final, counts = asyncio.run(scenario())
    assert counts["received"] == final.delivered >= 1
    assert final.read == final.delivered + final.in_flight + final.filtered + final.failed + final.rejected


class _Roles:
    """What take_batch reads from Roles: the queue and the rollouter (in-process)."""

    def __init__(self, queue, rollouter):
        self.queue = queue
        self.rollouter = type("R", (), {"health": _Remote(_as_async(rollouter.health)),
                                        "on_stale_dropped": _Remote(rollouter.on_stale_dropped),
                                        "progress": _Remote(_as_async(rollouter.progress))})()


class _NoSupervisor:
    async def maintain(self, policy_version, sync_due):
        return {}


def _as_async(fn):
    async def call(*args, **kwargs):
        return fn(*args, **kwargs)

    return call


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
