"""Keeps every rollout server slot serving: dead servers are replaced, re-joined and re-synced.

    a server dies (killed, OOM, engine crash)
    -> found by a failed request (the manager takes it out of routing at once, its groups are
       requeued) or by the health check here, whichever comes first
    -> killed for good; the weight-transfer group is re-formed without it; a fresh actor starts
       in the same placement-group bundle
    -> once its engine is up: the group is re-formed with it, every server is synced to the
       trainer's current policy_version, and only then does it get requests again.

Our own re-creation rather than Ray's actor restart: a restarted actor re-runs only __init__,
while the engine start, the group re-join and the catch-up sync need this controller anyway.
The transfer group (stateless gloo, or NCCL) has a fixed world size and cannot admit one new
member, so every membership change re-forms it for all members (trainer rank 0 and every live
engine): one rendezvous, well under a second, and no engine is paused for it.

Runs in the driver, between train steps and while the trainer waits for a batch (never during
a train step: the trainer's rank 0 takes part in every re-formation).
"""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from verl_async.rollout.manager import is_healthy
from verl_async.sync.coordinator import WeightSyncError

logger = logging.getLogger(__name__)


class ServerRestartsExhausted(RuntimeError):
    """A rollout server slot died more often than rollout.max_restarts allows."""


@dataclass
class _Replacement:
    handle: Any
    started: asyncio.Future  # the replacement's start(): its ServerInfo


class ServerSupervisor:
    """`servers`: the launch's list of server handles, kept current here (shutdown kills what it holds).
    `spawn(i)`: a new, unstarted RolloutServer actor for slot i. `coordinator`: the weight-sync
    coordinator (its `servers` are the slots in service). `rollouter`: the Rollouter actor."""

    def __init__(self, servers: list[Any], coordinator: Any, rollouter: Any, spawn: Callable[[int], Any],
                 max_restarts: int):
        self.servers = servers
        self.coordinator = coordinator
        self.rollouter = rollouter
        self.spawn = spawn
        self.max_restarts = max_restarts
        self.deaths = [0] * len(servers)  # per slot
        self.restarts = 0  # replacements back in service (rollout/server_restarts)
        self._replacing: dict[int, _Replacement] = {}

    def metrics(self) -> dict[str, float]:
        return {"rollout/server_restarts": float(self.restarts), "rollout/servers_restarting": float(len(self._replacing))}

    async def maintain(self, policy_version: int, sync_due: bool) -> dict[str, float]:
        """Retire dead servers, admit started replacements, and sync to `policy_version` (the trainer's
        current weights) when `sync_due` or when a replacement needs the weights first. Returns the
        sync's metrics, {} when none ran (nothing due, or no server in service)."""
        await self._retire(await self._find_dead())
        ready = await self._take_ready()
        if ready:
            await self.coordinator.form_group({**self.coordinator.servers, **{i: h for i, h, _ in ready}})
        if not (sync_due or ready) or not self.coordinator.servers:
            return {}
        metrics = await self._sync(policy_version)
        for index, handle, info in ready:
            if self.coordinator.servers.get(index) is handle:  # still alive after the sync
                await self.rollouter.add_server.remote(index, handle, info)
                self.restarts += 1
                logger.info("rollout server %d replaced and synced to policy_version %d", index, policy_version)
        if ready:
            await self.rollouter.on_step.remote(self.coordinator.policy_version)
        return metrics

    async def _sync(self, policy_version: int) -> dict[str, float]:
        """A sync that fails because a server died mid-way is retried once without it."""
        try:
            return await self.coordinator.sync(policy_version)
        except WeightSyncError as first:
            dead = await self._find_dead()
            if not dead:
                raise
            logger.warning("sync to policy_version %d failed with server(s) %s dead; retrying without them: %s",
                           policy_version, sorted(dead), first)
            await self._retire(dead)
            return await self.coordinator.sync(policy_version) if self.coordinator.servers else {}

    async def _find_dead(self) -> set[int]:
        """In-service servers that a request found dead, or that fail their health check now."""
        reported = set(await self.rollouter.lost_servers.remote())
        live = dict(self.coordinator.servers)
        healthy = await asyncio.gather(*(is_healthy(h) for h in live.values()))
        return {i for i, ok in zip(live, healthy, strict=True) if not ok} | (reported & set(live))

    async def _retire(self, dead: set[int]) -> None:
        if not dead:
            return
        import ray

        for index in sorted(dead):
            logger.error("rollout server %d is dead: replacing it (%d of rollout.max_restarts=%d)", index,
                         self.deaths[index] + 1, self.max_restarts)
            await self.rollouter.remove_server.remote(index)
            ray.kill(self.coordinator.servers.pop(index), no_restart=True)
            self._replace(index)
        await self.coordinator.form_group(self.coordinator.servers)

    def _replace(self, index: int) -> None:
        self.deaths[index] += 1
        if self.deaths[index] > self.max_restarts:
            raise ServerRestartsExhausted(
                f"rollout server {index} died {self.deaths[index]} times (rollout.max_restarts={self.max_restarts}); "
                "see its log for the cause (OOM? an engine setting?) and resume from the last checkpoint.")
        handle = self.spawn(index)
        self.servers[index] = handle
        self._replacing[index] = _Replacement(handle, asyncio.ensure_future(handle.start.remote()))

    async def _take_ready(self) -> list[tuple[int, Any, Any]]:
        """Replacements whose engine has started: (slot, handle, ServerInfo). One that failed to start
        is replaced again (it counts as another death of its slot)."""
        import ray

        ready = []
        for index, rep in list(self._replacing.items()):
            if not rep.started.done():
                continue
            del self._replacing[index]
            try:
                ready.append((index, rep.handle, rep.started.result()))
            except ray.exceptions.RayError as e:
                logger.error("replacement for rollout server %d failed to start: %s", index, e)
                ray.kill(rep.handle, no_restart=True)
                self._replace(index)
        return ready
