"""Where the weights go back: one sync moves the trainer's weights into every running engine.

    pause every server (keep in-flight requests, optionally clear caches)
    -> start_weight_update -> trainer broadcast || each server's update_weights (one call each)
    -> finish_weight_update(policy_version) -> resume

One control call per phase per server, never one per parameter. With ipc (trainer and engine on
one GPU) the transfer phase is the sender alone: it calls each server's update_weights once per
packed bucket itself, since an engine must load a bucket before the trainer reuses its memory. Every phase is timed out
(SyncConfig.timeout_s for the whole cycle); a failure raises WeightSyncError naming the phase
and each side's error, and the servers are resumed whatever happened. The tensor list is
checked before the pause (against what the engines accepted at the start-up handshake), so a
wrong name or shape never reaches an engine.

The transfer group's rendezvous is hosted by the trainer's rank 0, at the address and port it
reports for its own node (`rendezvous_address`), wherever the driver runs. A group has a fixed
membership: when a server dies or a replacement joins, `form_group` re-forms it for all members.
"""

import asyncio
import inspect
import logging
import socket
import time
from collections.abc import Awaitable
from typing import Any

from verl_async.config.sync import SyncConfig
from verl_async.sync import compat
from verl_async.sync.engine_side import resolve_backend
from verl_async.sync.names import check_metas
from verl_async.types import TensorMeta

logger = logging.getLogger(__name__)

RESUME_TIMEOUT_S = 60.0  # resume runs even after a timeout; it gets its own budget
PARTIAL_NOTE = (" (an update rejected 'before any data moved' leaves the engines untouched; an engine that "
                "failed after data started to move may hold partly loaded weights: restart it)")


class WeightSyncError(RuntimeError):
    """A sync failed. The message names the phase and what each side reported."""


async def call(target: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call `method` on a Ray actor handle, an object with async methods, or a plain object
    (run on a thread, so a blocking broadcast never stalls the event loop)."""
    from ray.actor import ActorHandle

    if isinstance(target, ActorHandle):
        return await getattr(target, method).remote(*args, **kwargs)
    fn = getattr(target, method)
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def local_address() -> str:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def rendezvous_address() -> tuple[str, int]:
    """This node's address and a port free on it: what the rank that hosts a rendezvous reports.
    Call it in the hosting process (trainer rank 0), never in the driver: they may be on other nodes."""
    return local_address(), free_port()


class WeightSyncCoordinator:
    """Drives syncs from the trainer's sender into a fixed set of rollout servers.

    `servers`: RolloutServer handles (init_weight_transfer, start_weight_update, update_weights,
    finish_weight_update, pause, resume), as a list or {server index: handle}. `sender`: the
    trainer's rank-0 handle with rendezvous_address, init_weight_sender, tensor_metas and
    send_weights. `device` resolves backend `auto` (None: CUDA if this process sees one); pass a
    resolved SyncConfig for a shared GPU (ipc). `workers_per_server`: vLLM workers per engine (its
    tensor x pipeline parallel size). `master_address`: overrides the address the sender reports.
    """

    def __init__(self, servers: list, sender: Any, sync: SyncConfig, *, pause_mode: str = "keep",
                 device: str | None = None,
                 workers_per_server: int = 1, master_address: str | None = None) -> None:
        if not servers:
            raise ValueError("WeightSyncCoordinator needs at least one rollout server")
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.servers: dict[int, Any] = dict(servers) if isinstance(servers, dict) else dict(enumerate(servers))
        self.sender = sender
        self.sync_config = sync
        if pause_mode not in ("keep", "wait"):
            raise ValueError(f"pause_mode={pause_mode!r}: use keep (in-flight requests continue under the new "
                             "weights) or wait (in-flight requests finish first)")
        self.pause_mode = pause_mode
        self.backend = resolve_backend(sync, device)
        self.workers_per_server = workers_per_server
        self.master_address = master_address
        self.policy_version: int | None = None
        self._accepted: dict[str, list[int]] | None = None  # name -> shape, from the handshake

    async def setup(self, policy_version: int = 0) -> dict[str, float]:
        """Form the transfer group (trainer rank 0, engines' workers after it), then sync once,
        so a broken path fails before step 0. Returns the handshake's metrics."""
        await self.form_group()
        return await self.sync(policy_version)

    async def form_group(self, servers: dict[int, Any] | None = None) -> None:
        """(Re-)form the transfer group: trainer rank 0, then the workers of every server in index order.
        `servers` replaces the membership first (a server died, or a replacement joins); with none left
        there is no group until one joins."""
        if servers is not None:
            self.servers = dict(servers)
        if not self.servers:
            return
        cfg = self.sync_config
        if self.backend == "ipc":  # no group: the handles travel with each bucket
            address, port = "", 0
        else:
            address, port = await asyncio.wait_for(call(self.sender, "rendezvous_address"), cfg.timeout_s)
            address, port = self.master_address or address, cfg.master_port or port
        world_size = 1 + len(self.servers) * self.workers_per_server
        # ipc: the sender drives the loads into these servers itself
        engines = {"servers": [self.servers[i] for i in sorted(self.servers)]} if self.backend == "ipc" else {}
        calls: dict[str, Awaitable] = {
            "sender": call(self.sender, "init_weight_sender", self.backend, address, port, world_size, cfg.timeout_s,
                           **engines)}
        for position, (i, server) in enumerate(sorted(self.servers.items())):
            info = compat.engine_init_info(
                self.backend, master_address=address, master_port=port, world_size=world_size,
                rank_offset=1 + position * self.workers_per_server, bucket_bytes=cfg.bucket_bytes,
                timeout_s=cfg.timeout_s)
            calls[f"server {i}"] = call(server, "init_weight_transfer", info)
        await self._phase("form the transfer group", calls, time.perf_counter() + cfg.timeout_s, -1)
        if self.backend == "ipc":
            logger.info("weight sync: CUDA IPC from the trainer into engine(s) %s on its GPU", sorted(self.servers))
        else:
            logger.info("weight sync: %s group of %d ranks formed at %s:%d (servers %s)", self.backend, world_size,
                        address, port, sorted(self.servers))

    async def sync(self, policy_version: int) -> dict[str, float]:
        """Move the sender's current weights into every server, labelled `policy_version`."""
        cfg = self.sync_config
        if not self.servers:
            raise WeightSyncError(f"sync to policy_version {policy_version}: no rollout server is in the group")
        metas: list[TensorMeta] = await asyncio.wait_for(call(self.sender, "tensor_metas"), cfg.timeout_s)
        if self._accepted is not None:
            try:
                check_metas(metas, self._accepted, what="the engines (as of the start-up handshake)")
            except ValueError as exc:
                raise WeightSyncError(f"sync to policy_version {policy_version}: {exc}") from exc
        # ipc has no update request of its own: the sender builds one per bucket
        update_info = None if self.backend == "ipc" else compat.engine_update_info(self.backend, metas, cfg.bucket_bytes)
        deadline = time.perf_counter() + cfg.timeout_s
        servers = dict(self.servers)
        timings: dict[str, float] = {}
        t_start = time.perf_counter()

        async def timed(key: str, label: str, calls: dict[str, Awaitable]) -> dict[str, Any]:
            t0 = time.perf_counter()
            out = await self._phase(label, calls, deadline, policy_version)
            timings[key] = time.perf_counter() - t0
            return out

        def each(method: str, *args: Any, **kwargs: Any) -> dict[str, Awaitable]:
            return {f"server {i}": call(s, method, *args, **kwargs) for i, s in servers.items()}

        failure: WeightSyncError | None = None
        try:
            await timed("sync/pause_s", "pause", each("pause", mode=self.pause_mode, clear_cache=cfg.clear_cache))
            await timed("sync/start_s", "start_weight_update", each("start_weight_update"))
            sent = await timed("sync/transfer_s", "transfer", self._transfer_calls(update_info, each))
            await timed("sync/finish_s", "finish_weight_update", each("finish_weight_update", policy_version))
        except WeightSyncError as exc:
            failure = exc
        finally:  # resume whatever happened, so no engine is left paused
            t0 = time.perf_counter()
            try:
                await self._phase("resume", each("resume"), t0 + min(RESUME_TIMEOUT_S, cfg.timeout_s), policy_version)
            except WeightSyncError as exc:
                if failure is None:
                    raise
                raise WeightSyncError(f"{failure}; then resume failed too: {exc}") from failure
            timings["sync/resume_s"] = time.perf_counter() - t0
        if failure is not None:
            raise failure
        if self._accepted is None:
            self._accepted = {m.name: list(m.shape) for m in metas}
        self.policy_version = policy_version
        stats = dict(sent["sender"])
        metrics = {**timings, "sync/total_s": time.perf_counter() - t_start,
                   "sync/bytes": stats.pop("sync/bytes"), "sync/gather_s": stats.pop("sync/gather_s"),
                   "sync/send_s": stats.pop("sync/transfer_s"), **stats}
        metrics["sync/GBps"] = metrics["sync/bytes"] / max(metrics["sync/transfer_s"], 1e-9) / 1e9
        logger.info("weight sync to policy_version %d: %.1f MB in %.3f s (transfer %.3f s)", policy_version,
                    metrics["sync/bytes"] / 1e6, metrics["sync/total_s"], metrics["sync/transfer_s"])
        return metrics

    def _transfer_calls(self, update_info: dict[str, Any] | None, each) -> dict[str, Awaitable]:
        """The sender broadcasts while every server receives; ipc: the sender hands each bucket over."""
        send = call(self.sender, "send_weights", self.sync_config.bucket_bytes)
        if update_info is None:
            return {"sender": send}
        return {"sender": send, **each("update_weights", update_info)}

    async def _phase(self, label: str, calls: dict[str, Awaitable], deadline: float,
                     policy_version: int) -> dict[str, Any]:
        """Run one phase's calls concurrently until all answer, one fails, or the deadline.
        After a failure the others get a few seconds to report theirs (the peer's error is
        usually the informative one)."""
        tasks = {name: asyncio.ensure_future(aw) for name, aw in calls.items()}
        done, pending = await asyncio.wait(tasks.values(), timeout=max(deadline - time.perf_counter(), 0),
                                           return_when=asyncio.FIRST_EXCEPTION)
        if pending and any(t.exception() for t in done):
            done, pending = await asyncio.wait(tasks.values(), timeout=min(5.0, max(deadline - time.perf_counter(), 0)))
        errors = [f"{name}: {_describe(t.exception())}" for name, t in tasks.items() if t in done and t.exception()]
        errors += [f"{name}: no answer before the {self.sync_config.timeout_s:g} s deadline"
                   for name, t in tasks.items() if t in pending]
        if errors:
            what = "setup" if policy_version < 0 else f"sync to policy_version {policy_version}"
            note = PARTIAL_NOTE if label in ("transfer", "finish_weight_update") else ""
            raise WeightSyncError(f"{what} failed in phase '{label}': " + " | ".join(errors) + note)
        return {name: t.result() for name, t in tasks.items()}

    @property
    def handshake_done(self) -> bool:
        return self._accepted is not None


def _describe(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    # Ray wraps remote errors in a long traceback; its last line is the original message.
    return f"{type(exc).__name__}: {last}" if last else repr(exc)

