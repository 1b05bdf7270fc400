"""How the trainer's model attends: padding-free varlen attention for packed rows, or padded rows.

Two layouts (training/batching.py builds both):
- packed: the micro-batch's rows are concatenated into one [1, L] sequence with per-row
  `cu_seq_lens`; attention runs per row, so it costs sum(len^2) and no position is padding.
  On CUDA this is torch's own FlashAttention varlen kernel (`torch.nn.attention.varlen`, no
  flash_attn package needed); elsewhere a per-row sdpa loop computes the same function (slow,
  for tests and odd devices).
- padded: rows right-padded to [B, longest] and run through causal sdpa with no mask. Causal
  attention never lets a real token see the padding after it, so the mask is not needed and
  sdpa keeps its flash kernel. Rows are length-sorted into micro-batches to keep padding low.

`resolve_attention("auto", ...)` picks packed wherever the varlen kernel runs (CUDA, bf16/fp16)
and padded otherwise. Vision-language rows always use padded (with a mask; the model derives
its multimodal positions from it).
"""

import functools
import importlib.util
import inspect
import logging

import torch

logger = logging.getLogger(__name__)

VARLEN_IMPLEMENTATION = "verl_async_varlen"
"""Our entry in transformers' AttentionInterface (registered by `register_varlen_attention`)."""
ATTENTION_CHOICES = ("auto", "packed", "padded")
VARLEN_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def varlen_kernel_available() -> bool:
    """torch ships FlashAttention's varlen kernel as torch.nn.attention.varlen (torch >= 2.10)."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve_attention(choice: str, device: torch.device, compute_dtype: torch.dtype, vision: bool) -> str:
    """The layout the trainer uses: "packed" or "padded" (see the module docstring)."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"trainer.attention={choice!r}: use one of {', '.join(ATTENTION_CHOICES)}")
    if vision:
        if choice == "packed":
            logger.warning("trainer.attention=packed: vision-language rows use the padded layout")
        return "padded"
    if choice != "auto":
        return choice
    fast = device.type == "cuda" and compute_dtype in VARLEN_DTYPES and varlen_kernel_available()
    return "packed" if fast else "padded"


def register_varlen_attention() -> str:
    """Register the varlen function with transformers (idempotent); returns its name for
    `attn_implementation=`. No mask is built for it: causality and row boundaries come from
    the `cu_seq_lens_q` / `max_length_q` kwargs the trainer passes to the model."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_IMPLEMENTATION, varlen_attention_forward)
    return VARLEN_IMPLEMENTATION


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                             **_: object) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [1, Hq, L, D], key/value [1, Hkv, L, D]
    -> ([1, L, Hq, D], None). Every row attends causally within itself only."""
    if cu_seq_lens_q is None or max_length_q is None:
        raise ValueError("varlen attention needs cu_seq_lens_q and max_length_q: call the model with a packed "
                         "MicroBatch (training.batching) or load it with attn_implementation='sdpa'")
    if query.shape[0] != 1:
        raise ValueError(f"varlen attention takes one packed sequence, got a batch of {query.shape[0]}")
    if dropout:
        raise ValueError("varlen attention has no dropout: the trainer runs with attention_dropout 0")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [L, H, D]
    dtype = _kernel_dtype(q)
    if dtype is not None:
        out = _flash_varlen(q.to(dtype), k.to(dtype), v.to(dtype), cu_seq_lens_q, int(max_length_q), scaling)
    else:
        out = per_row_attention(q, k, v, cu_seq_lens_q, scaling)
    return out[None], None


def _kernel_dtype(q: torch.Tensor) -> torch.dtype | None:
    """The dtype the flash kernel runs in, or None where it cannot run. Under autocast, rotary
    embeddings can promote q and k to fp32; they go back to the autocast dtype."""
    if not q.is_cuda or not varlen_kernel_available():
        return None
    if q.dtype in VARLEN_DTYPES:
        return q.dtype
    if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in VARLEN_DTYPES:
        return torch.get_autocast_dtype("cuda")
    return None


_GQA_KWARG: bool | None = None


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor, max_len: int,
                  scale: float | None) -> torch.Tensor:
    """torch's FlashAttention varlen kernel, causal (window (-1, 0)). The kernel takes fewer kv
    heads than query heads natively; torch >= 2.12 asks for that with enable_gqa=True."""
    global _GQA_KWARG
    from torch.nn.attention.varlen import varlen_attn

    if _GQA_KWARG is None:
        _GQA_KWARG = "enable_gqa" in inspect.signature(varlen_attn).parameters
    cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
    kwargs = {"enable_gqa": True} if _GQA_KWARG and k.shape[1] != q.shape[1] else {}
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0), **kwargs)


def per_row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor,
                      scale: float | None) -> torch.Tensor:
    """The varlen function written as one causal sdpa call per row ([L, H, D] in and out)."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seq_lens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start:
            continue
        qi, ki, vi = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [H, len, D]
        if groups > 1:
            ki, vi = ki.repeat_interleave(groups, dim=0), vi.repeat_interleave(groups, dim=0)
        att = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
        out[start:end] = att.transpose(0, 1)
    return out
