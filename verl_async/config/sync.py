"""Weight transfer from the trainer into the running rollout engines."""

from dataclasses import dataclass

from verl_async.config._check import check, check_choice

BACKENDS = ("auto", "nccl", "ipc", "gloo")
IPC_LOADS = ("in_place", "layerwise")


@dataclass
class SyncConfig:
    backend: str = "auto"
    """auto: ipc when trainer and engine share one GPU (cluster.shared_gpu), nccl when they have GPUs of
    their own, gloo on CPU. Or name one: nccl, ipc (CUDA IPC, one GPU), gloo."""
    bucket_bytes: int = 1 << 30
    """Tensors are packed into buckets of at most this many bytes (ipc: the trainer keeps two staging
    buffers of this size on the GPU; a larger tensor is handed over from its own memory)."""
    clear_cache: bool = True
    """Reset KV, prefix and multimodal caches at every sync (in-flight requests re-prefill under the new weights)."""
    timeout_s: float = 600.0
    """A sync that takes longer fails with context and leaves the engines serving their old weights."""
    master_port: int = 0
    """Port of the transfer group's rendezvous (0: pick a free one)."""
    ipc_load: str = "in_place"
    """ipc: how the engine loads each bucket. in_place: straight into its live parameters through the
    model's own weight loaders (unquantized weights on CUDA; a quantized model falls back to layerwise
    by itself). layerwise: vLLM's layerwise reload, which rebuilds every layer and runs its post-load
    processing (about 0.25 ms more a tensor: ~100 ms a sync at the 8B shape)."""

    def __post_init__(self) -> None:
        check_choice("sync.backend", self.backend, BACKENDS)
        check_choice("sync.ipc_load", self.ipc_load, IPC_LOADS)
        check(self.bucket_bytes >= 1 << 20, "sync.bucket_bytes", self.bucket_bytes, "use at least 1 MiB (1048576).")
        check(self.timeout_s > 0, "sync.timeout_s", self.timeout_s, "use a positive number of seconds.")
