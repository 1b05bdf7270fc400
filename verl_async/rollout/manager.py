"""The rollout manager: fronts N rollout servers (Ray actor handles) from the controller process.

It rejects prompts that cannot fit before they reach any engine, balances requests by
least outstanding requests, keeps a group's samples on one server (prefix caching), and
fans pause / resume out to every server and waits for all of them.

A server whose call fails and whose health check then fails too (its actor died, or its engine
did) is taken out of routing at once; its requests raise ServerLostError so the caller can
requeue them, and new requests go to the others (or wait until a server is live again). The
supervisor in the driver replaces it and hands the replacement back with `add_server`.
"""

import asyncio
import logging
from collections import OrderedDict

from verl_async.config import RolloutConfig
from verl_async.rollout.sampling import PromptTooLongError, clamp_max_tokens
from verl_async.rollout.server import GAUGES, ServerInfo
from verl_async.types import EnginePrompt, Generation

logger = logging.getLogger(__name__)

_MAX_AFFINITY_KEYS = 1 << 16  # remembered group -> server choices (oldest forgotten first)
HEALTH_TIMEOUT_S = 30.0  # a server that cannot answer a health check in this time counts as dead


class ServerLostError(RuntimeError):
    """The server running this request died (actor or engine); the request never finished."""


async def is_healthy(server) -> bool:
    """A RolloutServer's own health check, answered within HEALTH_TIMEOUT_S; any failure is False."""
    try:
        return bool(await asyncio.wait_for(server.health.remote(), HEALTH_TIMEOUT_S))
    except Exception:  # dead actor, timeout, engine error: all mean "not serving"
        return False


class RolloutManager:
    """Plain class in the controller process; `servers` are handles of RolloutServer actors."""

    def __init__(self, servers: list, infos: list[ServerInfo], rollout: RolloutConfig):
        if not servers or len(servers) != len(infos):
            raise ValueError(f"need one ServerInfo per server, got {len(servers)} servers and {len(infos)} infos")
        self._servers = list(servers)
        self._infos = list(infos)
        self._rollout = rollout
        self._outstanding = [0] * len(servers)
        self._affinity: OrderedDict[str, int] = OrderedDict()
        self._requests: dict[str, int] = {}  # in-flight request id -> server index
        self._counters = {"rollout/rejected_too_long": 0.0}
        self._live = [True] * len(servers)
        self._lost: set[int] = set()  # taken out of routing here, not yet removed by the supervisor
        self._live_again: asyncio.Event | None = None  # set when a server rejoins (made in the running loop)
        self._last_stats: dict[int, dict[str, float]] = {}
        self._retired: dict[str, float] = {}  # counters of replaced servers, so merged counters stay monotone

    @property
    def max_model_len(self) -> int:
        """The smallest effective context window over the servers (every prompt must fit all)."""
        return min(info.max_model_len for info in self._infos)

    @property
    def outstanding(self) -> list[int]:
        return list(self._outstanding)

    async def generate(self, prompt_id: str, request_id: str, prompt: EnginePrompt,
                       max_tokens: int | None = None, sampling: dict | None = None,
                       affinity_key: str | None = None) -> Generation:
        """Generate on the least-loaded server (or the one `affinity_key` already uses).

        Raises PromptTooLongError, counted as rollout/rejected_too_long, before any engine sees it.
        """
        sampling = dict(sampling or {})
        try:
            budget = clamp_max_tokens(
                len(prompt.prompt_ids), self.max_model_len, self._rollout.response_length,
                max_tokens=max_tokens if max_tokens is not None else sampling.get("max_tokens"),
                max_new_tokens=sampling.get("max_new_tokens"), prompt_id=prompt_id)
        except PromptTooLongError:
            self._counters["rollout/rejected_too_long"] += 1
            logger.warning("rejected prompt %s (request %s): %d tokens, max_model_len %d",
                           prompt_id, request_id, len(prompt.prompt_ids), self.max_model_len)
            raise
        index = await self._pick(affinity_key)
        server = self._servers[index]
        self._outstanding[index] += 1
        self._requests[request_id] = index
        try:
            return await server.generate.remote(request_id, prompt, budget, sampling)
        except PromptTooLongError:
            raise
        except Exception as e:  # re-raised: as ServerLostError when the server itself is gone
            if await self._lose_if_dead(index, server):
                raise ServerLostError(f"rollout server {index} died with request {request_id} in flight "
                                      f"({type(e).__name__})") from e
            raise
        finally:
            self._outstanding[index] -= 1
            self._requests.pop(request_id, None)

    async def _pick(self, affinity_key: str | None) -> int:
        while not any(self._live):  # every server is being replaced: wait for one to rejoin
            if self._live_again is None:
                self._live_again = asyncio.Event()
            self._live_again.clear()
            await self._live_again.wait()
        chosen = self._affinity.get(affinity_key) if affinity_key is not None else None
        if chosen is not None and self._live[chosen]:
            self._affinity.move_to_end(affinity_key)
            return chosen
        live = [i for i in range(len(self._servers)) if self._live[i]]
        index = min(live, key=lambda i: (self._outstanding[i], i))
        if affinity_key is not None:
            self._affinity[affinity_key] = index
            if len(self._affinity) > _MAX_AFFINITY_KEYS:
                self._affinity.popitem(last=False)
        return index

    # ---- membership ----------------------------------------------------------------------

    async def _lose_if_dead(self, index: int, server) -> bool:
        """After a failed call: True (and out of routing) when `server` is dead, not just the request."""
        if self._servers[index] is not server:
            return True  # already replaced: that old server is gone
        if not self._live[index]:
            return True
        if await is_healthy(server):
            return False
        if self._servers[index] is server and self._live[index]:
            self._live[index] = False
            self._lost.add(index)
            logger.error("rollout server %d is dead: out of routing until it is replaced", index)
        return True

    def lost_servers(self) -> list[int]:
        """Servers this manager found dead that the supervisor has not removed yet."""
        return sorted(self._lost)

    def remove_server(self, index: int) -> None:
        """Out of routing (the supervisor found it dead, or replaces it); its last counters are kept."""
        self._live[index] = False
        self._lost.discard(index)
        for name, value in self._last_stats.pop(index, {}).items():
            if name not in GAUGES:
                self._retired[name] = self._retired.get(name, 0.0) + value

    def add_server(self, index: int, server, info: ServerInfo) -> None:
        """Route to `server` (a started replacement, already on the current weights) as server `index`."""
        self.remove_server(index)  # idempotent: keeps the old server's counters once
        self._servers[index], self._infos[index] = server, info
        self._live[index] = True
        self._affinity = OrderedDict((k, i) for k, i in self._affinity.items() if i != index)
        if self._live_again is not None:
            self._live_again.set()
        logger.info("rollout server %d is back in routing", index)

    @property
    def num_live(self) -> int:
        return sum(self._live)

    def _live_servers(self) -> list[tuple[int, object]]:
        return [(i, s) for i, s in enumerate(self._servers) if self._live[i]]

    # ---- fan-out ---------------------------------------------------------------------------

    async def pause(self, mode: str = "keep", clear_cache: bool = True) -> None:
        await asyncio.gather(*(s.pause.remote(mode, clear_cache) for _, s in self._live_servers()))

    async def resume(self) -> None:
        await asyncio.gather(*(s.resume.remote() for _, s in self._live_servers()))

    async def abort_all(self) -> None:
        """Abort every in-flight request; their generate() calls return with FinishReason.ABORT."""
        calls = [self._servers[i].abort.remote(rid) for rid, i in list(self._requests.items()) if self._live[i]]
        await asyncio.gather(*calls, return_exceptions=True)  # a server that died meanwhile has nothing to abort

    async def stats(self) -> dict[str, float]:
        """Merged over live servers: counters and counts summed (replaced servers' counters included, so
        they never go down); KV usage the max; policy_version the min."""
        live = self._live_servers()
        answers = await asyncio.gather(*(s.stats.remote() for _, s in live), return_exceptions=True)
        merged: dict[str, float] = dict(self._retired)
        for (index, _), server_stats in zip(live, answers, strict=True):
            if isinstance(server_stats, BaseException):
                continue  # died since the last check: the supervisor finds it
            self._last_stats[index] = server_stats
            for name, value in server_stats.items():
                if name not in merged:
                    merged[name] = value
                elif "kv_cache_usage" in name:
                    merged[name] = max(merged[name], value)
                elif name == "rollout/policy_version":
                    merged[name] = min(merged[name], value)
                else:
                    merged[name] += value
        for name, value in self._counters.items():
            merged[name] = merged.get(name, 0.0) + value
        return merged
