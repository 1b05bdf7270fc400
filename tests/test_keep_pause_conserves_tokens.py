"""Keep-mode pause/resume loses no token, and every token carries the right policy_version.

The counter model's greedy output is prev + STEP (mod 1024): a dropped, repeated or shifted
token shows as a wrong step. Weights alternate between the STEP=1 and STEP=2 counters at
some pauses (reloaded from disk, a new policy_version each time), so each token's step also
proves which weights produced it: step 1 under even versions, step 2 under odd ones. That
checks the per-token version attribution exactly, position by position. On vLLM >= 0.32 the
server also cross-checks its attribution against vLLM's own weight-version spans.
"""

import asyncio
import logging
import random

import pytest

from verl_async.config import ModelConfig, RolloutConfig, SyncConfig
from verl_async.rollout.server import RolloutServer
from verl_async.types import EnginePrompt, FinishReason

logger = logging.getLogger(__name__)
VOCAB = 1024
NUM_REQUESTS = 32
MAX_TOKENS = 128
MIN_CYCLES = 20
GREEDY = {"temperature": 0.0, "ignore_eos": True}


def step_of(version: int) -> int:
    return 2 if version % 2 else 1


def bad_steps(gen) -> list[int]:
    """Positions whose token is not prev + step(version of that token)."""
    prev, bad = gen.prompt_ids[-1], []
    for i, (tok, ver) in enumerate(zip(gen.response_ids, gen.policy_versions, strict=True)):
        if tok != (prev + step_of(ver)) % VOCAB:
            bad.append(i)
        prev = tok
    return bad


@pytest.fixture(scope="module")
def server(ray_session, counters):
    path = counters[1]
    rollout = RolloutConfig(max_model_len="512", kv_cache_memory_bytes=64 << 20, max_num_seqs=64,
                            response_length=MAX_TOKENS, temperature=0.0)
    handle = ray_session.remote(num_cpus=1)(RolloutServer).remote(
        0, path, ModelConfig(path=path), rollout, SyncConfig(), "cpu")
    info = ray_session.get(handle.start.remote(), timeout=900)
    yield handle, info
    ray_session.get(handle.shutdown.remote())
    ray_session.kill(handle)


def test_keep_pause_conserves_tokens_across_random_pauses_and_weight_flips(server, counters, ray_session):
    handle, _ = server
    rng = random.Random(0)
    before = ray_session.get(handle.stats.remote())
    version = int(before["rollout/policy_version"])

    async def run():
        nonlocal version
        refs = [handle.generate.remote(f"keep-{i}", EnginePrompt([rng.randrange(VOCAB), rng.randrange(VOCAB)]),
                                       MAX_TOKENS, GREEDY) for i in range(NUM_REQUESTS)]
        late, cycles_in_flight, flips = [], 0, 0
        while cycles_in_flight < MIN_CYCLES + 4:
            await asyncio.sleep(rng.uniform(0.0, 0.05))
            await handle.pause.remote("keep", True)
            stats = await handle.stats.remote()
            if stats["rollout/outstanding"] == 0:
                await handle.resume.remote()
                break
            cycles_in_flight += 1
            if rng.random() < 0.5:  # a weight update inside this pause
                version += 1
                flips += 1
                await handle.reload_weights.remote(counters[step_of(version)], version)
                if len(late) < 4:  # submitted while paused, after the update: no older weights
                    late.append((version, handle.generate.remote(
                        f"late-{version}", EnginePrompt([rng.randrange(VOCAB)]), MAX_TOKENS, GREEDY)))
            await handle.resume.remote()
        gens = await asyncio.gather(*refs)
        late_gens = [(v, await ref) for v, ref in late]
        return gens, late_gens, cycles_in_flight, flips

    gens, late_gens, cycles, flips = asyncio.run(run())
    after = ray_session.get(handle.stats.remote())
    logger.info("keep-pause: %d pauses in flight, %d weight flips, %d late requests; stats delta %s",
                cycles, flips, len(late_gens), {k: after[k] - before[k] for k in after if after[k] != before[k]})

    assert cycles >= MIN_CYCLES, f"only {cycles} pauses hit running requests"
    assert flips >= 3
    for gen in gens + [g for _, g in late_gens]:
        assert gen.finish_reason == FinishReason.LENGTH
        assert len(gen.response_ids) == len(gen.logprobs) == len(gen.policy_versions) == MAX_TOKENS
        assert gen.policy_versions == sorted(gen.policy_versions)
        assert bad_steps(gen) == [], f"{gen.request_id}: wrong step at {bad_steps(gen)[:5]}"
    for v, gen in late_gens:  # submitted after update v: never an older version (a later flip may come first)
        assert gen.policy_versions[0] >= v
    assert len({tuple(g.policy_versions) for g in gens}) > 1 or max(gens[0].policy_versions) > 0
    assert after["rollout/token_conservation_errors"] == 0
    assert after["rollout/version_attribution_errors"] == 0
    if after["rollout/version_checks"]:  # vLLM >= 0.32 labels tokens itself: every request agreed
        assert after["rollout/version_checks"] - before["rollout/version_checks"] == len(gens) + len(late_gens)
    assert after["rollout/preemptions_from_sync"] > before["rollout/preemptions_from_sync"]
    assert after["rollout/preemptions"] == before["rollout/preemptions"]  # no memory pressure here
    assert after["rollout/policy_version"] == version


def test_keep_pause_abort_returns_tokens_so_far(server, ray_session):
    handle, _ = server

    async def run():
        ref = handle.generate.remote("abort-1", EnginePrompt([3, 4]), 400, GREEDY)
        for _ in range(500):
            if (await handle.stats.remote())["rollout/outstanding"] and (await handle.stats.remote())["rollout/num_running"]:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        await handle.abort.remote("abort-1")
        return await ref

    gen = asyncio.run(run())
    assert gen.finish_reason == FinishReason.ABORT
    assert 0 < len(gen.response_ids) < 400 and len(gen.logprobs) == len(gen.response_ids)
    assert bad_steps(gen) == []
    assert ray_session.get(handle.stats.remote())["rollout/token_conservation_errors"] == 0
