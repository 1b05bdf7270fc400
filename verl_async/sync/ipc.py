"""CUDA-IPC weight transfer on one GPU: the trainer packs buckets into its own GPU memory, each engine
maps that memory (CUDA IPC) and loads the bucket through vLLM's IPC weight-transfer engine.

There is no collective group: the trainer hands every bucket over with one control call per engine
(`update_weights` with the bucket's names, dtypes, shapes, byte sizes and the IPC handle of its
memory), and it reuses that memory only after every engine has loaded the bucket. Two staging
buffers alternate, so the trainer packs bucket k+1 while the engines load bucket k. A tensor larger
than a bucket is handed over from its own memory (no copy).

Handle bookkeeping: every bucket gets a fresh export (`reduce_tensor`), which pairs with the one
release each engine makes per update in both vLLM versions (0.26 releases right after loading,
0.32 at the next bucket or at finish_weight_update), so torch's cross-process ref counts balance
and a freed export is reclaimed by `torch.cuda.ipc_collect`. The staging buffers themselves live
as long as the sender, so no buffer is ever freed while an engine maps it.
"""

import asyncio
import concurrent.futures
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from verl_async.sync import compat
from verl_async.sync.names import dtype_name
from verl_async.types import TensorMeta

NUM_BUFFERS = 2  # staging buffers; also the most buckets handed over and not yet loaded


@runtime_checkable
class EngineLink(Protocol):
    """How the trainer reaches the engines: start one bucket's load everywhere, wait for it."""

    def submit(self, update_info: dict[str, Any]) -> Any: ...

    def wait(self, ticket: Any, timeout_s: float) -> None: ...


class RayEngineLink:
    """RolloutServer Ray actor handles (their `update_weights`)."""

    def __init__(self, servers: Iterable[Any]) -> None:
        self.servers = list(servers)

    def submit(self, update_info: dict[str, Any]) -> list[Any]:
        return [s.update_weights.remote(update_info) for s in self.servers]

    def wait(self, ticket: list[Any], timeout_s: float) -> None:
        import ray

        try:
            ray.get(ticket, timeout=max(timeout_s, 0.0))
        except ray.exceptions.GetTimeoutError as exc:
            raise TimeoutError(str(exc)) from exc


class LoopEngineLink:
    """Objects with an `async update_weights` running on `loop` (the trainer runs on another thread)."""

    def __init__(self, servers: Iterable[Any], loop: asyncio.AbstractEventLoop) -> None:
        self.servers, self.loop = list(servers), loop

    def submit(self, update_info: dict[str, Any]) -> concurrent.futures.Future:
        async def update_all() -> None:
            await asyncio.gather(*(s.update_weights(update_info) for s in self.servers))

        return asyncio.run_coroutine_threadsafe(update_all(), self.loop)

    def wait(self, ticket: concurrent.futures.Future, timeout_s: float) -> None:
        try:
            ticket.result(timeout=max(timeout_s, 0.0))
        except concurrent.futures.TimeoutError as exc:
            ticket.cancel()
            raise TimeoutError("no answer") from exc


def engine_link(engines: Any) -> EngineLink:
    """An EngineLink as given, or RolloutServer Ray handles wrapped in one."""
    if isinstance(engines, EngineLink):
        return engines
    if not engines:
        raise ValueError("the ipc backend needs the engines it loads into: pass RolloutServer handles or an EngineLink")
    return RayEngineLink(engines)


def gpu_uuid(device: torch.device) -> str:
    """The physical GPU's UUID: what the engines key IPC handles by (the same GPU has the same UUID
    in every process, whatever CUDA_VISIBLE_DEVICES each one was given)."""
    return str(torch.cuda.get_device_properties(device).uuid)


def cuda_ipc_handle(flat: torch.Tensor, uuid: str) -> dict[str, tuple]:
    """A fresh export of `flat` (a 1-D uint8 CUDA tensor) for vLLM's IPC consumer."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(flat)
    return {uuid: args}


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s bytes as a flat uint8 view (a copy only when it is not contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def starts_new_bucket(used: int, nbytes: int, itemsize: int, bucket_bytes: int) -> bool:
    """Close a non-empty bucket before a tensor that would overflow it, or that would start at an
    offset its dtype cannot be viewed at (the engine views each tensor in place: offsets are unpadded)."""
    return used > 0 and (used + nbytes > bucket_bytes or used % itemsize != 0)


@dataclass
class _Bucket:
    metas: list[TensorMeta] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    nbytes: int = 0


@dataclass
class _Handover:
    ticket: Any
    slot: int | None  # staging buffer it occupies (None: a large tensor sent from its own memory)
    index: int
    keepalive: torch.Tensor | None


class IpcSender:
    """Trainer side of the ipc backend: one instance per trainer rank 0, reused for every sync.

    `export` turns a flat uint8 tensor into an IPC handle dict (tests on CPU pass a stand-in);
    `device` is where the staging buffers live (default: the current CUDA device).
    """

    def __init__(self, engines: EngineLink, timeout_s: float, *, device: torch.device | None = None,
                 export: Callable[[torch.Tensor, str], dict[str, tuple]] = cuda_ipc_handle) -> None:
        self.link, self.timeout_s, self.export = engines, timeout_s, export
        self.device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        self.uuid = gpu_uuid(self.device) if self.device.type == "cuda" else self.device.type
        self.buffers: list[torch.Tensor | None] = [None] * NUM_BUFFERS

    def buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        buf = self.buffers[slot]
        if buf is None or buf.numel() < nbytes:
            buf = self.buffers[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buf

    def send(self, named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> dict[str, float]:
        """Hand every tensor to the engines; returns sync/buckets and sync/engine_wait_s."""
        transfer = _Transfer(self, bucket_bytes, time.monotonic() + self.timeout_s)
        for name, tensor in named:
            transfer.add(name, tensor)
        transfer.finish()
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()  # reclaim exports the engines have released (large tensors)
        return {"sync/buckets": float(transfer.count), "sync/engine_wait_s": transfer.wait_s}

    def close(self) -> None:
        self.buffers = [None] * NUM_BUFFERS


class _Transfer:
    """The state of one send: the bucket being packed and the buckets handed over, oldest first."""

    def __init__(self, sender: IpcSender, bucket_bytes: int, deadline: float) -> None:
        self.sender, self.bucket_bytes, self.deadline = sender, bucket_bytes, deadline
        self.bucket = _Bucket()
        self.slot = 0
        self.inflight: deque[_Handover] = deque()
        self.count = 0
        self.wait_s = 0.0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        flat = as_bytes(tensor)
        n = flat.numel()
        if n == 0:  # no bytes to hand over (and an empty CUDA tensor has no memory to export)
            return
        meta = TensorMeta(name=name, dtype=dtype_name(tensor.dtype), shape=list(tensor.shape))
        if n > self.bucket_bytes:  # travels alone, straight from its own memory
            self.flush()
            self._hand_over(flat, [meta], [n], slot=None, keepalive=flat)
            return
        if starts_new_bucket(self.bucket.nbytes, n, tensor.element_size(), self.bucket_bytes):
            self.flush()
        if self.bucket.nbytes == 0:
            self._free_slot(self.slot)  # the engines are done with what this buffer held
        buf = self.sender.buffer(self.slot, self.bucket_bytes)
        buf[self.bucket.nbytes:self.bucket.nbytes + n].copy_(flat)
        self.bucket.metas.append(meta)
        self.bucket.sizes.append(n)
        self.bucket.nbytes += n

    def flush(self) -> None:
        if self.bucket.nbytes == 0:
            return
        buf = self.sender.buffers[self.slot]
        self._hand_over(buf[:self.bucket.nbytes], self.bucket.metas, self.bucket.sizes, slot=self.slot, keepalive=None)
        self.bucket = _Bucket()
        self.slot = (self.slot + 1) % NUM_BUFFERS

    def finish(self) -> None:
        self.flush()
        while self.inflight:
            self._wait_oldest()

    def _hand_over(self, flat: torch.Tensor, metas: list[TensorMeta], sizes: list[int], *, slot: int | None,
                   keepalive: torch.Tensor | None) -> None:
        while len(self.inflight) >= NUM_BUFFERS:
            self._wait_oldest()
        if flat.is_cuda:
            torch.cuda.current_stream(flat.device).synchronize()  # every copy into it has landed
        info = compat.ipc_update_info(metas, sizes, self.sender.export(flat, self.sender.uuid))
        self.inflight.append(_Handover(self.sender.link.submit(info), slot, self.count, keepalive))
        self.count += 1

    def _free_slot(self, slot: int) -> None:
        while any(h.slot == slot for h in self.inflight):
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        handover = self.inflight.popleft()
        t0 = time.perf_counter()
        try:
            self.sender.link.wait(handover.ticket, self.deadline - time.monotonic())
        except TimeoutError as exc:
            raise TimeoutError(f"the engines did not load IPC bucket {handover.index} within the sync deadline "
                               f"(sync.timeout_s={self.sender.timeout_s:g})") from exc
        finally:
            self.wait_s += time.perf_counter() - t0
