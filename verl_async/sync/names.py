"""Which trainer tensors go to the engines, under which names: pure functions, no torch import.

The engines' loaders (`model.load_weights`) accept Hugging Face checkpoint names and map them
to their own layout (stacked qkv, Qwen3-VL's `model.language_model.` / `model.visual.`), so
the trainer sends checkpoint names. What this module adds: strip wrapper segments that FSDP2,
activation checkpointing or torch.compile put into `named_parameters()`, skip the output layer
of a tied model (it is the embedding), skip frozen parts, and check a sync's tensor list
against what an engine expects before a single byte moves.
"""

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from verl_async.types import TensorMeta

# Segments wrappers insert into parameter names; never part of a checkpoint name.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
# Qwen3-VL's vision tower in transformers 5 naming (what the trainer's module reports).
VISION_TOWER_PREFIXES = ("model.visual.",)
TIED_OUTPUT_NAMES = ("lm_head.weight",)


def checkpoint_name(param_name: str) -> str:
    """`named_parameters()` name -> checkpoint name: drop wrapper segments (and DDP's leading `module.`)."""
    parts = [p for p in param_name.split(".") if p not in WRAPPER_SEGMENTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def is_sent(name: str, *, tied: bool, skip_prefixes: Sequence[str] = ()) -> bool:
    """Whether checkpoint tensor `name` is sent: not the tied output layer, not under a skipped prefix."""
    if tied and name in TIED_OUTPUT_NAMES:
        return False
    return not any(name.startswith(p) for p in skip_prefixes)


def select_weights(
    named: Iterable[tuple[str, Any]], *, tied: bool, skip_prefixes: Sequence[str] = (),
    skip_frozen: bool = False,
) -> Iterator[tuple[str, Any]]:
    """Yield `(checkpoint name, tensor)` for what a sync sends, in the trainer's order.

    `named` is `model.named_parameters()` (tensors are yielded as given, so an FSDP2 DTensor is
    gathered only when the caller materializes it). `skip_frozen` drops tensors with
    `requires_grad=False`: they never change, so the engine's copy stays right.
    """
    for param_name, tensor in named:
        name = checkpoint_name(param_name)
        if skip_frozen and not tensor.requires_grad:
            continue
        if is_sent(name, tied=tied, skip_prefixes=skip_prefixes):
            yield name, tensor


def dtype_name(dtype: Any) -> str:
    """`torch.bfloat16` -> "bfloat16" (the TensorMeta / vLLM wire spelling)."""
    return str(dtype).removeprefix("torch.")


def sync_tensor_metas(
    named: Iterable[tuple[str, Any]], *, tied: bool, skip_prefixes: Sequence[str] = (),
    skip_frozen: bool = False,
) -> list[TensorMeta]:
    """TensorMeta of every tensor `select_weights` yields, same order. Reads only global
    `.shape`/`.dtype`, so FSDP2 DTensors are not gathered."""
    return [
        TensorMeta(name=name, dtype=dtype_name(t.dtype), shape=list(t.shape))
        for name, t in select_weights(named, tied=tied, skip_prefixes=skip_prefixes, skip_frozen=skip_frozen)
    ]


def check_metas(metas: Sequence[TensorMeta], expected: Mapping[str, Sequence[int]], *, what: str) -> None:
    """Raise ValueError naming every unknown, duplicated or wrongly shaped tensor in `metas`.

    `expected` maps checkpoint name -> full shape (what the engine's model holds). Tensors the
    engine expects but `metas` omits are allowed: a sync may leave frozen parts out.
    """
    problems: list[str] = []
    seen: set[str] = set()
    for m in metas:
        if m.name in seen:
            problems.append(f"{m.name!r} is sent twice")
        seen.add(m.name)
        if m.name not in expected:
            problems.append(f"{m.name!r} is unknown to {what}")
        elif list(expected[m.name]) != list(m.shape):
            problems.append(f"{m.name!r} has shape {list(m.shape)} where {what} has {list(expected[m.name])}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(
            f"weight update rejected before any data moved: {shown}. Send checkpoint names "
            "(verl_async.sync.names.select_weights strips wrapper prefixes and skips lm_head of a "
            "tied model) from a model with the engine's architecture and sizes."
        )

