"""Packed buckets for the gloo transfer: many tensors travel as one uint8 buffer per bucket.

Both ends cut the same buckets from the same tensor list: a bucket holds consecutive
tensors, at most `bucket_bytes` in all (each tensor padded to ALIGN bytes so every one can be
viewed back in its dtype); a tensor larger than `bucket_bytes` travels alone.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from verl_async.types import TensorMeta

ALIGN = 8  # bytes; the widest dtype we send (float64/int64) needs this to be viewed in place


def padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}: use a torch dtype name such as bfloat16 or float32")
    return dtype


def meta_nbytes(meta: TensorMeta) -> int:
    numel = 1
    for d in meta.shape:
        numel *= d
    return numel * torch_dtype(meta.dtype).itemsize


def starts_new_bucket(used: int, nbytes: int, bucket_bytes: int) -> bool:
    """The one packing rule: a non-empty bucket closes before a tensor that would overflow it."""
    return used > 0 and used + padded(nbytes) > bucket_bytes


def plan_buckets(nbytes: Sequence[int], bucket_bytes: int) -> list[range]:
    """Indices of the tensors in each bucket, for tensors of `nbytes` bytes in send order."""
    buckets: list[range] = []
    start, used = 0, 0
    for i, n in enumerate(nbytes):
        if starts_new_bucket(used, n, bucket_bytes):
            buckets.append(range(start, i))
            start, used = i, 0
        used += padded(n)
    if start < len(nbytes):
        buckets.append(range(start, len(nbytes)))
    return buckets


@dataclass
class Bucket:
    """One packed buffer: which metas it holds and its size in bytes (padding included)."""

    metas: list[TensorMeta]
    nbytes: int


def bucket_layout(metas: Sequence[TensorMeta], bucket_bytes: int) -> list[Bucket]:
    sizes = [meta_nbytes(m) for m in metas]
    return [Bucket([metas[i] for i in r], sum(padded(sizes[i]) for i in r))
            for r in plan_buckets(sizes, bucket_bytes)]


def pack(tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy `tensors` (any device, contiguous or not) into one CPU uint8 buffer, ALIGN-padded."""
    total = sum(padded(t.numel() * t.element_size()) for t in tensors)
    buf = out[:total] if out is not None and out.numel() >= total else torch.empty(total, dtype=torch.uint8)
    offset = 0
    for t in tensors:
        raw = t.detach().reshape(-1).contiguous().view(torch.uint8)
        buf[offset:offset + raw.numel()].copy_(raw)
        offset += padded(raw.numel())
    return buf


def unpack(buf: torch.Tensor, metas: Sequence[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """Views into `buf` (no copy), one per meta, in the metas' dtypes and shapes."""
    out = []
    offset = 0
    for m in metas:
        n = meta_nbytes(m)
        out.append((m.name, buf[offset:offset + n].view(torch_dtype(m.dtype)).view(m.shape)))
        offset += padded(n)
    return out
