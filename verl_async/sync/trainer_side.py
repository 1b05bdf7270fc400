"""Trainer side of the weight transfer: rank 0 of the group, sends named tensors in packed buckets.

Built once by trainer rank 0 (`WeightSender`). nccl and gloo broadcast to the engines' workers while
the engines run `update_weights`; ipc (one shared GPU) has no group: the sender itself drives each
bucket's `update_weights` on the engines (sync/ipc.py). With FSDP2 every rank must materialize the
full tensors in lockstep (`full_tensor()` is a collective); the iterator handed to `send` is
where that happens, so its waiting time is reported as `sync/gather_s`.
"""

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from verl_async.sync import compat, gloo
from verl_async.sync.buckets import pack, padded, starts_new_bucket

logger = logging.getLogger(__name__)


class WeightRejected(RuntimeError):
    """An engine refused the update before any data moved (its own error says why)."""


class _Timed:
    """Wraps the tensor stream: counts bytes and the time spent producing tensors (the gather)."""

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._it = iter(named)
        self.nbytes = 0
        self.wait_s = 0.0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        t0 = time.perf_counter()
        try:
            name, tensor = next(self._it)
        finally:
            self.wait_s += time.perf_counter() - t0
        self.nbytes += tensor.numel() * tensor.element_size()
        return name, tensor


class WeightSender:
    """Rank 0 of the transfer group; the engines' workers are ranks 1..world_size-1.

    Construction blocks until every worker has joined (the engines' `init_weight_transfer`
    must run at the same time). `send` must run while the engines run `update_weights`
    with the same tensor list (names, dtypes, shapes, order).

    ipc: `engines` (RolloutServer handles or an ipc.EngineLink) are what `send` loads each bucket
    into; the address, port and world size are not used.
    """

    def __init__(self, backend: str, master_address: str, master_port: int, world_size: int,
                 timeout_s: float, engines: Any = None) -> None:
        if backend not in ("nccl", "gloo", "ipc"):
            raise ValueError(f"backend={backend!r}: use nccl, ipc or gloo (resolve `auto` with "
                             "engine_side.resolve_backend)")
        self.backend = backend
        self.timeout_s = timeout_s
        if backend == "ipc":
            from verl_async.sync.ipc import IpcSender, engine_link

            self._group = IpcSender(engine_link(engines), timeout_s)
            logger.info("weight sync: CUDA IPC sender on %s (GPU %s)", self._group.device, self._group.uuid)
            return
        if backend == "nccl":
            self._group = compat.nccl_trainer_group(master_address, master_port, world_size)
        else:
            self._group = compat.gloo_group(master_address, master_port, 0, world_size, timeout_s)
        logger.info("weight sync: %s group formed at %s:%d, world size %d", backend, master_address,
                    master_port, world_size)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> dict[str, float]:
        """Broadcast every tensor; returns sync/bytes, sync/transfer_s and sync/gather_s."""
        if self._group is None:
            raise RuntimeError("WeightSender is closed")
        timed = _Timed(named_tensors)
        t0 = time.perf_counter()
        extra: dict[str, float] = {}
        if self.backend == "ipc":
            extra = self._group.send(timed, bucket_bytes)
        elif self.backend == "nccl":
            compat.nccl_send_packed(self._group, timed, bucket_bytes)
        else:
            self._send_gloo(timed, bucket_bytes)
        return {"sync/bytes": float(timed.nbytes), "sync/transfer_s": time.perf_counter() - t0,
                "sync/gather_s": timed.wait_s, **extra}

    def _send_gloo(self, named: Iterator[tuple[str, torch.Tensor]], bucket_bytes: int) -> None:
        if gloo.vote(self._group, False, self.timeout_s):
            raise WeightRejected("an engine rejected the weight update before any data moved; "
                                 "its update_weights error says why")
        scratch = torch.empty(0, dtype=torch.uint8)  # reused: a broadcast returns once its bytes left

        def flush(tensors: list[torch.Tensor]) -> None:
            nonlocal scratch
            packed = pack(tensors, out=scratch)
            scratch = packed if packed.numel() > scratch.numel() else scratch
            gloo.broadcast(self._group, packed, self.timeout_s)

        pending: list[torch.Tensor] = []
        used = 0
        for _name, tensor in named:
            nbytes = tensor.numel() * tensor.element_size()
            if starts_new_bucket(used, nbytes, bucket_bytes):
                flush(pending)
                pending, used = [], 0
            pending.append(tensor)
            used += padded(nbytes)
        if pending:
            flush(pending)

    def close(self) -> None:
        if self.backend == "ipc" and self._group is not None:
            self._group.close()
        self._group = None  # both group kinds release their communicators when collected
