"""RolloutManager routing, rejection, fan-out and stats merging, on real Ray actors.

The actors are light stand-ins for RolloutServer (same method names, no engine): this module
tests the manager's own logic; the engine itself is tested in test_keep_pause_*,
test_prompt_too_long_* and test_engine_metrics_*.
"""

import asyncio
import sys

import pytest
import ray

from verl_async.config import RolloutConfig
from verl_async.rollout.manager import RolloutManager
from verl_async.rollout.sampling import PromptTooLongError
from verl_async.rollout.server import ServerInfo
from verl_async.types import EnginePrompt, FinishReason, Generation

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/


class EchoServer:
    def __init__(self, index: int, kv_usage: float):
        self.index = index
        self.kv_usage = kv_usage
        self.calls: list[tuple[str, int]] = []
        self.pauses: list[tuple[str, bool]] = []
        self.resumes = 0
        self.aborted: set[str] = set()
        self.policy_version = index

    async def generate(self, request_id, prompt, max_tokens=None, sampling=None):
        self.calls.append((request_id, max_tokens))
        for _ in range(200):  # hold the request ~1 s unless aborted
            if request_id in self.aborted:
                break
            await asyncio.sleep(0.005)
        reason = FinishReason.ABORT if request_id in self.aborted else FinishReason.LENGTH
        return Generation(request_id, prompt.prompt_ids, [1], [0.0], [0], reason, server_index=self.index)

    async def abort(self, request_id):
        self.aborted.add(request_id)

    async def pause(self, mode="keep", clear_cache=True):
        self.pauses.append((mode, clear_cache))

    async def resume(self):
        self.resumes += 1

    async def stats(self):
        return {"rollout/generation_tokens": 10.0, "rollout/kv_cache_usage": self.kv_usage,
                "rollout/policy_version": float(self.policy_version)}

    async def state(self):
        return {"calls": self.calls, "pauses": self.pauses, "resumes": self.resumes}

    async def health(self):
        return True


@pytest.fixture(scope="module")
def servers(ray_session):
    actor = ray_session.remote(num_cpus=0)(EchoServer)
    handles = [actor.remote(i, 0.1 * (i + 1)) for i in range(3)]
    infos = [ServerInfo(i, m, 1, "test") for i, m in enumerate((512, 256, 1024))]
    yield handles, infos
    for h in handles:
        ray_session.kill(h)


def manager(servers, **kw):
    handles, infos = servers
    return RolloutManager(handles, infos, RolloutConfig(response_length=64, **kw))


def test_rollout_manager_max_model_len_is_min_over_servers(servers):
    assert manager(servers).max_model_len == 256


def test_rollout_manager_least_outstanding_and_affinity(servers):
    m = manager(servers)
    prompt = EnginePrompt([1, 2, 3])

    async def run():
        plain = [asyncio.create_task(m.generate(f"p{i}", f"lo-{i}", prompt)) for i in range(6)]
        await asyncio.sleep(0.1)
        assert m.outstanding == [2, 2, 2]
        group = [asyncio.create_task(m.generate("g", f"grp-{i}", prompt, affinity_key="group-A"))
                 for i in range(5)]
        return await asyncio.gather(*plain), await asyncio.gather(*group)

    plain, group = asyncio.run(run())
    assert sorted(g.server_index for g in plain) == [0, 0, 1, 1, 2, 2]
    assert len({g.server_index for g in group}) == 1
    assert m.outstanding == [0, 0, 0]


def test_rollout_manager_passes_the_clamped_budget(servers):
    handles, _ = servers
    m = manager(servers)
    gen = asyncio.run(m.generate("p", "budget-1", EnginePrompt([0] * 250), max_tokens=100))
    calls = ray_get(handles[gen.server_index].state.remote())["calls"]
    assert ("budget-1", 6) in calls  # min max_model_len 256 - 250 prompt tokens


def test_rollout_manager_rejects_too_long_before_any_server(servers):
    handles, _ = servers
    m = manager(servers)
    before = sum(len(ray_get(h.state.remote())["calls"]) for h in handles)
    with pytest.raises(PromptTooLongError) as err:
        asyncio.run(m.generate("prompt-xyz", "long-1", EnginePrompt([0] * 256)))
    assert err.value.prompt_id == "prompt-xyz" and err.value.max_model_len == 256
    after = sum(len(ray_get(h.state.remote())["calls"]) for h in handles)
    assert after == before
    stats = asyncio.run(m.stats())
    assert stats["rollout/rejected_too_long"] == 1.0


def test_rollout_manager_pause_resume_fan_out_and_stats_merge(servers):
    handles, _ = servers
    m = manager(servers)
    asyncio.run(m.pause("keep", False))
    asyncio.run(m.resume())
    for h in handles:
        state = ray_get(h.state.remote())
        assert state["pauses"][-1] == ("keep", False) and state["resumes"] >= 1
    stats = asyncio.run(m.stats())
    assert stats["rollout/generation_tokens"] == 30.0
    assert stats["rollout/kv_cache_usage"] == pytest.approx(0.3)
    assert stats["rollout/policy_version"] == 0.0


def test_rollout_manager_abort_all(servers):
    m = manager(servers)

    async def run():
        tasks = [asyncio.create_task(m.generate("p", f"ab-{i}", EnginePrompt([1]))) for i in range(4)]
        await asyncio.sleep(0.1)
        await m.abort_all()
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)

    assert all(g.finish_reason == FinishReason.ABORT for g in asyncio.run(run()))


def test_rollout_manager_takes_a_dead_server_out_of_routing_and_waits_for_a_replacement(ray_session):
    """A killed actor: its request raises ServerLostError (the caller requeues), the server is out of
    routing at once, new requests go elsewhere or wait until add_server brings one back."""
    from verl_async.rollout.manager import ServerLostError

    actor = ray_session.remote(num_cpus=0)(EchoServer)
    handles = [actor.remote(i, 0.1) for i in range(2)]
    infos = [ServerInfo(i, 512, 1, "test") for i in range(2)]
    m = RolloutManager(handles, infos, RolloutConfig(response_length=8))
    prompt = EnginePrompt([1, 2, 3])

    async def run():
        doomed = asyncio.create_task(m.generate("p", "doomed", prompt, affinity_key="g"))
        await asyncio.sleep(0.2)
        victim = m._requests["doomed"]
        ray.kill(handles[victim])
        with pytest.raises(ServerLostError, match=f"rollout server {victim} died"):
            await doomed
        assert m.lost_servers() == [victim] and m.num_live == 1
        again = await m.generate("p", "again", prompt, affinity_key="g")  # same group, the other server
        assert again.server_index == 1 - victim
        stats = await m.stats()  # the dead server is left out, not an error
        m.remove_server(victim)
        m.remove_server(1 - victim)  # now none is live: a request waits
        waiting = asyncio.create_task(m.generate("p", "waits", prompt))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        m.add_server(victim, actor.remote(victim, 0.1), infos[victim])
        return stats, await asyncio.wait_for(waiting, 10)

    stats, waited = asyncio.run(run())
    assert waited.finish_reason == FinishReason.LENGTH and waited.server_index in (0, 1)
    assert m.lost_servers() == [] and m.num_live == 1
    assert stats["rollout/generation_tokens"] == 10.0  # only the live server answered


def ray_get(ref):
    return ray.get(ref)
