"""vLLM engine arguments for one rollout server, from the typed config slices.

Logprobs are the processed ones (after temperature / top-p: the distribution actually
sampled), stats are always on (the server reads per-request token counts from them), and
the weight-transfer settings come from the sync component.
"""

import logging

from verl_async.config import ModelConfig, RolloutConfig, SyncConfig
from verl_async.data.vision import is_vl_model

logger = logging.getLogger(__name__)


def _weight_transfer_kwargs(sync: SyncConfig, device: str) -> dict:
    try:
        from verl_async.sync.engine_side import weight_transfer_kwargs
    except ImportError:  # the sync component is optional for generation-only use
        logger.warning("verl_async.sync.engine_side is not available: engine starts without weight transfer")
        return {}
    return weight_transfer_kwargs(sync, device)


def engine_args(model_path: str, model: ModelConfig, rollout: RolloutConfig, sync: SyncConfig,
                device: str, max_images_per_prompt: int = 1):
    """AsyncEngineArgs for one server. `device` is "cpu" or "cuda". VL models take up to
    `max_images_per_prompt` images per prompt (data.max_images_per_prompt) and no video."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: use cpu or cuda.")
    if device == "cpu" and rollout.kv_cache_memory_bytes <= 0:
        raise ValueError("rollout.kv_cache_memory_bytes must be set on CPU (e.g. 268435456 for "
                         "256 MiB); vLLM's default reserves most of the RAM.")
    max_model_len = rollout.max_model_len_or_auto
    kwargs = dict(
        model=model_path,
        dtype=model.dtype,
        trust_remote_code=model.trust_remote_code,
        seed=rollout.seed,
        max_model_len=-1 if max_model_len is None else max_model_len,  # -1: fit to KV memory
        tensor_parallel_size=rollout.tensor_parallel_size,
        max_num_seqs=rollout.max_num_seqs,
        enable_prefix_caching=rollout.enable_prefix_caching,
        enforce_eager=rollout.enforce_eager or device == "cpu",
        logprobs_mode="processed_logprobs",
        disable_log_stats=False,  # per-request token counts and engine metrics come from stats
    )
    if rollout.kv_cache_memory_bytes > 0:
        kwargs["kv_cache_memory_bytes"] = rollout.kv_cache_memory_bytes
    if device == "cuda":
        kwargs["gpu_memory_utilization"] = rollout.gpu_memory_utilization
    if is_vl_model(model_path):
        kwargs["limit_mm_per_prompt"] = {"image": max_images_per_prompt, "video": 0}
    kwargs.update(_weight_transfer_kwargs(sync, device))
    return AsyncEngineArgs(**kwargs)
