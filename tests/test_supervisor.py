"""The server supervisor's decisions, on real Ray actors that stand in for RolloutServers (no engine):
a dead server is retired and the transfer group re-formed without it at once; its replacement is
admitted only after the group is re-formed with it and everyone is synced; a replacement that fails
to start counts as another death; rollout.max_restarts bounds the deaths of a slot."""

import asyncio
import sys

import pytest
import ray

from verl_async.config import SyncConfig
from verl_async.pipeline.supervisor import ServerRestartsExhausted, ServerSupervisor
from verl_async.rollout.server import ServerInfo
from verl_async.sync.coordinator import WeightSyncCoordinator
from verl_async.types import TensorMeta

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/


class StandInServer:
    def __init__(self, index: int, fail_start: bool = False):
        self.index, self.fail_start, self.calls = index, fail_start, []

    async def start(self):
        await asyncio.sleep(0.2)
        if self.fail_start:
            raise RuntimeError("engine failed to start")
        return ServerInfo(self.index, 256, 1, "stand-in")

    async def health(self):
        return True

    async def calls_seen(self):
        return self.calls

    async def init_weight_transfer(self, info):
        self.calls.append(("init", info["world_size"]))

    async def pause(self, mode="keep", clear_cache=True):
        self.calls.append("pause")

    async def start_weight_update(self):
        pass

    async def update_weights(self, info):
        pass

    async def finish_weight_update(self, policy_version):
        self.calls.append(("finish", policy_version))

    async def resume(self):
        pass


class Sender:
    def __init__(self):
        self.world_sizes = []

    async def rendezvous_address(self):
        return "127.0.0.1", 1

    async def init_weight_sender(self, backend, address, port, world_size, timeout_s):
        self.world_sizes.append(world_size)

    async def tensor_metas(self):
        return [TensorMeta("w", "float32", [2])]

    async def send_weights(self, bucket_bytes):
        return {"sync/bytes": 8.0, "sync/transfer_s": 0.0, "sync/gather_s": 0.0}


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class Rollouter:
    """What the supervisor calls on the Rollouter actor, recorded."""

    def __init__(self):
        self.events, self.lost = [], []
        for name in ("lost_servers", "remove_server", "add_server", "on_step"):
            setattr(self, name, _Remote(getattr(self, "_" + name)))

    async def _lost_servers(self):
        return list(self.lost)

    async def _remove_server(self, index):
        self.events.append(("remove", index))
        self.lost = [i for i in self.lost if i != index]

    async def _add_server(self, index, handle, info):
        self.events.append(("add", index))

    async def _on_step(self, version):
        self.events.append(("on_step", version))


async def _dead(handle) -> None:
    """ray.kill returns before the actor is gone: wait until it no longer answers."""
    for _ in range(200):
        try:
            await handle.health.remote()
        except ray.exceptions.RayActorError:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the killed actor still answers")


async def _started(sup: ServerSupervisor, index: int) -> None:
    """Wait until the replacement for `index` finished its start() (or failed it)."""
    await asyncio.wait([sup._replacing[index].started], timeout=60)


def test_supervisor_replaces_resyncs_and_bounds_restarts(ray_session):
    actor = ray_session.remote(num_cpus=0)(StandInServer)
    fail_next = []
    spawn = lambda i: actor.remote(i, fail_start=bool(fail_next and fail_next.pop()))  # noqa: E731
    servers = [actor.remote(0), actor.remote(1)]
    ray.get([s.health.remote() for s in servers])  # both actor processes are up
    sender, rollouter = Sender(), Rollouter()

    async def scenario():
        coord = WeightSyncCoordinator(servers, sender, SyncConfig(timeout_s=60.0), device="cpu")
        await coord.setup(policy_version=0)
        sup = ServerSupervisor(list(servers), coord, rollouter, spawn, max_restarts=2)
        ray.kill(servers[1])  # found by the health check (no request saw it)
        await _dead(servers[1])
        assert await sup.maintain(3, sync_due=False) == {}
        assert sorted(coord.servers) == [0] and sender.world_sizes[-1] == 2 and ("remove", 1) in rollouter.events
        await _started(sup, 1)
        metrics = await sup.maintain(3, sync_due=False)  # admitted: group re-formed with it, everyone synced
        assert "sync/total_s" in metrics and sorted(coord.servers) == [0, 1] and sender.world_sizes[-1] == 3
        assert rollouter.events[-2:] == [("add", 1), ("on_step", 3)] and sup.restarts == 1
        replacement = sup.servers[1]
        assert ("finish", 3) in await replacement.calls_seen.remote()
        assert ("finish", 3) in await servers[0].calls_seen.remote()  # the live one took the same version

        fail_next.append(True)  # slot 1 dies again, and its next replacement fails to start
        ray.kill(replacement)
        await _dead(replacement)
        rollouter.lost = [1]  # this time a failed request reported it first
        await sup.maintain(4, sync_due=True)  # retires it; syncs the survivor
        await _started(sup, 1)
        with pytest.raises(ServerRestartsExhausted, match="rollout server 1 died 3 times"):
            await sup.maintain(4, sync_due=False)  # the failed start is death 3 > max_restarts=2
        return sup

    sup = asyncio.run(scenario())
    assert sup.deaths == [0, 3] and sup.restarts == 1
    for handle in [*sup.servers, *servers]:
        ray.kill(handle)
