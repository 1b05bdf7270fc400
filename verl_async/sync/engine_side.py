"""What a rollout engine needs at start-up to take weight updates: the resolved backend, its vLLM
engine-args kwargs and its environment."""

import dataclasses
from typing import Any

from verl_async.config._check import check
from verl_async.config.sync import SyncConfig
from verl_async.sync.compat import vllm_backend

GLOO_WORKER_EXTENSION = "verl_async.sync.gloo_engine.GlooWorkerExtension"
IPC_WORKER_EXTENSION = "verl_async.sync.ipc_engine.IpcWorkerExtension"
# vLLM's IPC engine unpickles the handles it receives (`ipc_handles_pickled`) only with this set. The
# pickle comes from our own trainer process on the same machine.
IPC_ENGINE_ENV = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


def resolve_backend(sync: SyncConfig, device: str, shared_gpu: bool = False) -> str:
    """`auto` -> ipc when trainer and engine share one GPU, nccl when they have GPUs of their own,
    gloo on CPU. nccl and ipc need CUDA (the config check rejects nccl on a shared GPU and ipc on
    separate ones)."""
    if sync.backend == "auto":
        if device != "cuda":
            return "gloo"
        return "ipc" if shared_gpu else "nccl"
    check(not (sync.backend in ("nccl", "ipc") and device != "cuda"), "sync.backend", sync.backend,
          f"{sync.backend} needs CUDA devices; use `auto` or `gloo` on CPU.")
    return sync.backend


def resolved_sync(sync: SyncConfig, device: str, shared_gpu: bool = False) -> SyncConfig:
    """`sync` with its backend resolved, so every component (engines, trainer, coordinator) agrees."""
    return dataclasses.replace(sync, backend=resolve_backend(sync, device, shared_gpu))


def weight_transfer_kwargs(sync: SyncConfig, device: str) -> dict[str, Any]:
    """Kwargs for vLLM's AsyncEngineArgs: the transfer backend and, for our own engines (gloo, ipc
    loaded in place), the worker extension whose import registers the engine inside each worker."""
    from vllm.config.weight_transfer import WeightTransferConfig

    backend = resolve_backend(sync, device)
    kwargs: dict[str, Any] = {"weight_transfer_config": WeightTransferConfig(backend=vllm_backend(backend, sync.ipc_load))}
    if backend == "gloo":
        kwargs["worker_extension_cls"] = GLOO_WORKER_EXTENSION
    elif backend == "ipc" and sync.ipc_load == "in_place":
        kwargs["worker_extension_cls"] = IPC_WORKER_EXTENSION
    return kwargs


def engine_env(backend: str) -> dict[str, str]:
    """Environment variables the engine's processes need for `backend` (resolved)."""
    return dict(IPC_ENGINE_ENV) if backend == "ipc" else {}
