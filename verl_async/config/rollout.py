"""The vLLM rollout servers: engine settings and sampling defaults."""

from dataclasses import dataclass

from verl_async.config._check import check, check_choice


@dataclass
class RolloutConfig:
    num_servers: int = 1
    """Number of rollout servers (one vLLM AsyncLLM engine each)."""
    tensor_parallel_size: int = 1
    """GPUs per engine (1 on CPU)."""
    n: int = 8
    """Samples per prompt (the GRPO group size)."""
    response_length: int = 64
    """Default generation budget per sample; explicit max_tokens wins but is still clamped to the context."""
    max_model_len: str = "auto"
    """Engine context window in tokens, or `auto` (the engine fits it to the KV memory; we read back the value it picked)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass. Only 1.0: the trainer's log-probs do not apply the truncation (see __post_init__)."""
    top_k: int = -1
    """Top-k sampling. Only -1 or 0 (off), for the same reason as top_p."""
    max_num_seqs: int = 128
    """Most requests an engine runs at once."""
    gpu_memory_utilization: float = 0.85
    """GPU: fraction of GPU memory the engine may use (weights + KV)."""
    kv_cache_memory_bytes: int = 0
    """KV-cache size in bytes; 0 = let vLLM decide on GPU. Required on CPU (the default reserves most of the RAM)."""
    enforce_eager: bool = False
    """Disable CUDA graphs (always on for CPU)."""
    enable_prefix_caching: bool = True
    """Reuse KV of shared prompt prefixes (a group's samples go to one server for this)."""
    seed: int = 0
    """Engine sampling seed."""
    cpu_threads_per_server: int = 1
    """CPU: cores each engine binds (VLLM_CPU_OMP_THREADS_BIND); servers get disjoint cores."""
    metrics_port: int = 0
    """Prometheus endpoint port on each server (0: off)."""
    max_restarts: int = 3
    """Times each rollout server may be replaced after it died (killed, OOM, engine crash); one more death
    ends the run. A replacement rejoins the weight-transfer group and takes the current weights first."""

    def __post_init__(self) -> None:
        check(self.num_servers >= 1, "rollout.num_servers", self.num_servers, "use at least 1.")
        check(self.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", self.tensor_parallel_size, "use at least 1.")
        check(self.n >= 1, "rollout.n", self.n, "use at least 1 sample per prompt (GRPO needs >= 2).")
        check(self.response_length >= 1, "rollout.response_length", self.response_length, "use at least 1 token.")
        check(self.max_model_len == "auto" or (self.max_model_len.isdigit() and int(self.max_model_len) > 0),
              "rollout.max_model_len", self.max_model_len, "use `auto` or a positive token count.")
        check(self.temperature >= 0.0, "rollout.temperature", self.temperature, "use 0 (greedy) or more.")
        # vLLM returns the log-probs of the truncated distribution it sampled from (processed_logprobs);
        # the trainer computes them over the full vocabulary, so with truncation the two disagree on
        # every token and the importance ratios are silently wrong.
        check(self.top_p == 1.0, "rollout.top_p", self.top_p,
              "use 1.0: the trainer's log-probs cover the full vocabulary and would not match the engine's "
              "truncated sampling distribution (steer exploration with rollout.temperature instead).")
        check(self.top_k in (-1, 0), "rollout.top_k", self.top_k,
              "use -1 (off): the trainer's log-probs cover the full vocabulary and would not match the "
              "engine's top-k sampling distribution (steer exploration with rollout.temperature instead).")
        check(self.max_restarts >= 0, "rollout.max_restarts", self.max_restarts, "use 0 (never replace) or more.")
        check(0.0 < self.gpu_memory_utilization <= 1.0, "rollout.gpu_memory_utilization",
              self.gpu_memory_utilization, "use a fraction in (0, 1].")
        check(self.kv_cache_memory_bytes >= 0, "rollout.kv_cache_memory_bytes", self.kv_cache_memory_bytes, "use 0 or more bytes.")
        check(self.max_num_seqs >= 1, "rollout.max_num_seqs", self.max_num_seqs, "use at least 1.")

    @property
    def max_model_len_or_auto(self) -> int | None:
        """The requested context window, or None for `auto`."""
        return None if self.max_model_len == "auto" else int(self.max_model_len)


def check_device(rollout: RolloutConfig, device: str) -> None:
    """Cross-checks that depend on the device the job runs on."""
    check_choice("cluster.device", device, ("cpu", "cuda"))
    if device == "cpu":
        check(rollout.kv_cache_memory_bytes > 0, "rollout.kv_cache_memory_bytes", rollout.kv_cache_memory_bytes,
              "set it on CPU (e.g. 268435456 for 256 MiB); vLLM's default reserves most of the RAM.")
        check(rollout.tensor_parallel_size == 1, "rollout.tensor_parallel_size", rollout.tensor_parallel_size,
              "use 1 on CPU.")
