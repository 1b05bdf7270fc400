"""Weight transfer from the trainer into the running rollout engines."""

from dataclasses import dataclass

from verl_async.config._check import check, check_choice


@dataclass
class SyncConfig:
    backend: str = "auto"
    """auto (nccl on GPU, gloo on CPU), nccl or gloo."""
    bucket_bytes: int = 1 << 30
    """Tensors are packed into buckets of at most this many bytes."""
    clear_cache: bool = True
    """Reset KV, prefix and multimodal caches at every sync (in-flight requests re-prefill under the new weights)."""
    timeout_s: float = 600.0
    """A sync that takes longer fails with context and leaves the engines serving their old weights."""
    master_port: int = 0
    """Port of the transfer group's rendezvous (0: pick a free one)."""

    def __post_init__(self) -> None:
        check_choice("sync.backend", self.backend, ("auto", "nccl", "gloo"))
        check(self.bucket_bytes >= 1 << 20, "sync.bucket_bytes", self.bucket_bytes, "use at least 1 MiB (1048576).")
        check(self.timeout_s > 0, "sync.timeout_s", self.timeout_s, "use a positive number of seconds.")
