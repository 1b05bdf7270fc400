"""The rollout manager: fronts N rollout servers (Ray actor handles) from the controller process.

It rejects prompts that cannot fit before they reach any engine, balances requests by
least outstanding requests, keeps a group's samples on one server (prefix caching), and
fans pause / resume out to every server and waits for all of them.
"""

import asyncio
import logging
from collections import OrderedDict

from verl_async.config import RolloutConfig
from verl_async.rollout.sampling import PromptTooLongError, clamp_max_tokens
from verl_async.rollout.server import ServerInfo
from verl_async.types import EnginePrompt, Generation

logger = logging.getLogger(__name__)

_MAX_AFFINITY_KEYS = 1 << 16  # remembered group -> server choices (oldest forgotten first)


class RolloutManager:
    """Plain class in the controller process; `servers` are handles of RolloutServer actors."""

    def __init__(self, servers: list, infos: list[ServerInfo], rollout: RolloutConfig):
        if not servers or len(servers) != len(infos):
            raise ValueError(f"need one ServerInfo per server, got {len(servers)} servers and {len(infos)} infos")
        self._servers = servers
        self._infos = infos
        self._rollout = rollout
        self._outstanding = [0] * len(servers)
        self._affinity: OrderedDict[str, int] = OrderedDict()
        self._requests: dict[str, int] = {}  # in-flight request id -> server index
        self._counters = {"rollout/rejected_too_long": 0.0}

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
        index = self._pick(affinity_key)
        self._outstanding[index] += 1
        self._requests[request_id] = index
        try:
            return await self._servers[index].generate.remote(request_id, prompt, budget, sampling)
        finally:
            self._outstanding[index] -= 1
            self._requests.pop(request_id, None)

    def _pick(self, affinity_key: str | None) -> int:
        if affinity_key is not None and affinity_key in self._affinity:
            self._affinity.move_to_end(affinity_key)
            return self._affinity[affinity_key]
        index = min(range(len(self._servers)), key=lambda i: (self._outstanding[i], i))
        if affinity_key is not None:
            self._affinity[affinity_key] = index
            if len(self._affinity) > _MAX_AFFINITY_KEYS:
                self._affinity.popitem(last=False)
        return index

    async def pause(self, mode: str = "keep", clear_cache: bool = True) -> None:
        await asyncio.gather(*(s.pause.remote(mode, clear_cache) for s in self._servers))

    async def resume(self) -> None:
        await asyncio.gather(*(s.resume.remote() for s in self._servers))

    async def abort_all(self) -> None:
        """Abort every in-flight request; their generate() calls return with FinishReason.ABORT."""
        calls = [self._servers[i].abort.remote(rid) for rid, i in list(self._requests.items())]
        await asyncio.gather(*calls)

    async def stats(self) -> dict[str, float]:
        """Merged over servers: counters and counts summed; KV usage the max; policy_version the min."""
        merged: dict[str, float] = {}
        for server_stats in await asyncio.gather(*(s.stats.remote() for s in self._servers)):
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
