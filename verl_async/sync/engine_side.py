"""What a rollout engine needs at start-up to take weight updates: its vLLM engine-args kwargs."""

from typing import Any

from verl_async.config._check import check
from verl_async.config.sync import SyncConfig
from verl_async.sync.compat import vllm_backend

GLOO_WORKER_EXTENSION = "verl_async.sync.gloo_engine.GlooWorkerExtension"


def resolve_backend(sync: SyncConfig, device: str) -> str:
    """`auto` -> nccl on CUDA, gloo on CPU. NCCL needs CUDA on both ends."""
    if sync.backend == "auto":
        return "nccl" if device == "cuda" else "gloo"
    check(not (sync.backend == "nccl" and device != "cuda"), "sync.backend", sync.backend,
          "nccl needs CUDA devices; use `auto` or `gloo` on CPU.")
    return sync.backend


def weight_transfer_kwargs(sync: SyncConfig, device: str) -> dict[str, Any]:
    """Kwargs for vLLM's AsyncEngineArgs: the transfer backend and, for gloo, the worker
    extension whose import registers our engine inside each spawned worker."""
    from vllm.config.weight_transfer import WeightTransferConfig

    backend = resolve_backend(sync, device)
    kwargs: dict[str, Any] = {"weight_transfer_config": WeightTransferConfig(backend=vllm_backend(backend))}
    if backend == "gloo":
        kwargs["worker_extension_cls"] = GLOO_WORKER_EXTENSION
    return kwargs
