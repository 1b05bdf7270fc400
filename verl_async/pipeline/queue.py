"""The bounded sample queue between rollouter and trainer (a Ray actor; plain class here).

Complete, scored groups go in (the producer waits for room first, outside its own locks); the trainer takes a batch with
`get_batch`, which applies the hard staleness bound: a group too old for the trainer's
current policy_version is dropped there and counted, never trained on.
"""

import asyncio
import time
from dataclasses import dataclass

from verl_async.pipeline.staleness import within_bound
from verl_async.types import Group


@dataclass
class BatchResult:
    groups: list[Group]
    stale_dropped: int  # groups dropped for staleness while forming this batch
    wait_s: float  # how long the caller waited


class SampleQueue:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._groups: list[Group] = []
        self._changed = asyncio.Condition()
        self.received = 0
        self.taken = 0
        self.stale_dropped = 0

    async def wait_for_room(self, timeout_s: float) -> bool:
        """True once the queue has room for one more group; False after `timeout_s`."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: len(self._groups) < self.capacity), timeout_s)
            except TimeoutError:
                return False
            return True

    async def put(self, group: Group) -> None:
        """Append a group (callers wait for room first: see `wait_for_room`)."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._groups) < self.capacity)
            self._groups.append(group)
            self.received += 1
            self._changed.notify_all()

    async def get_batch(self, num_groups: int, trainer_version: int, max_staleness: int,
                        timeout_s: float) -> BatchResult:
        """FIFO groups within the staleness bound. Fewer than asked on timeout, or as soon as the
        queue runs empty after dropping stale groups: the caller must free their admission slots
        before more groups can start."""
        start, taken, dropped = time.monotonic(), [], 0
        async with self._changed:
            while len(taken) < num_groups:
                remaining = timeout_s - (time.monotonic() - start)
                if not self._groups:
                    if remaining <= 0 or dropped:
                        break
                    try:
                        await asyncio.wait_for(self._changed.wait(), timeout=remaining)
                    except TimeoutError:
                        break
                    continue
                group = self._groups.pop(0)
                if within_bound(trainer_version, group.min_policy_version, max_staleness):
                    taken.append(group)
                else:
                    dropped += 1
            self._changed.notify_all()
        self.taken += len(taken)
        self.stale_dropped += dropped
        return BatchResult(taken, dropped, time.monotonic() - start)

    def depth(self) -> int:
        return len(self._groups)

    def counts(self) -> dict[str, int]:
        return {"received": self.received, "taken": self.taken, "stale_dropped": self.stale_dropped,
                "queued": len(self._groups)}

    def snapshot(self) -> list[Group]:
        """The queued groups, for a checkpoint (resume puts them back; none is lost)."""
        return list(self._groups)

    async def restore(self, groups: list[Group]) -> None:
        async with self._changed:
            self._groups = list(groups) + self._groups
            self.received += len(groups)
            self._changed.notify_all()
