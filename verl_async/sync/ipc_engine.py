"""Engine side of the ipc backend with in-place loading: vLLM's CUDA-IPC weight-transfer engine,
minus the layerwise reload for models whose weights need no post-load processing.

vLLM's IPC engine wraps every update in a layerwise reload: each layer is rebuilt on the meta
device, every incoming tensor first runs its weight loader under a copy-counting dispatch mode,
then the layer is materialised, loaded again and copied back into the live parameters. That is
what quantized models need (their post-load processing repacks weights), but for unquantized
weights on CUDA vLLM's post-load processing does nothing, and the per-tensor Python work is most
of a one-GPU sync (about 0.25 ms a tensor, ~100 ms at the 8B shape; benchmarks/weight_sync_gpu.py).

In place: each bucket goes straight through `model.load_weights`, the model's own loaders (they
fuse q/k/v and gate/up), into the live parameters. Every other part of the protocol is vLLM's:
the IPC handles, the packed bucket layout, the per-bucket synchronise and release. A quantized
model falls back to the layerwise reload (logged once), so choosing in_place is never unsafe.

vLLM builds this engine from its factory in the worker process: engine args name
`IpcWorkerExtension` as `worker_extension_cls` so each worker imports this module (which
registers the backend) first (engine_side.weight_transfer_kwargs).
"""

import logging

from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

from verl_async.sync import compat

logger = logging.getLogger(__name__)


def loads_in_place(quantization: str | None, device_type: str) -> bool:
    """Whether updates may skip vLLM's layerwise reload: unquantized weights on CUDA, where the
    linear layers' post-load processing is a no-op (on CPU it repacks weights for oneDNN)."""
    return quantization is None and device_type == "cuda"


class InPlaceIpcEngine(IPCWeightTransferEngine):
    """vLLM's IPC engine; start/finish skip the layerwise reload when `loads_in_place`."""

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.in_place = loads_in_place(self.model_config.quantization, self.device.type)
        if not self.in_place:
            logger.warning("weight sync: %s weights on %s need vLLM's layerwise reload; in-place loading is off",
                           self.model_config.quantization or "unquantized", self.device.type)

    def start_weight_update(self) -> None:
        if not self.in_place:
            super().start_weight_update()

    def finish_weight_update(self) -> None:
        if not self.in_place:
            super().finish_weight_update()


class IpcWorkerExtension:
    """vLLM's `worker_extension_cls`: each worker imports this module, registering the engine. No methods."""


compat.register_engine(compat.IPC_IN_PLACE_BACKEND, InPlaceIpcEngine)
