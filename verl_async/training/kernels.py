"""Fused replacements for a model's eager building blocks, swapped in before FSDP wraps it.

RMSNorm: HF's Qwen/Llama RMSNorm is six elementwise kernels (upcast, square, mean, rsqrt,
scale, weight) in the forward and more in the backward, four times per decoder layer; torch's
`rms_norm` runs one fused kernel each way on CUDA (torch >= 2.8). Same function: it differs
from HF's only in where the bf16 rounding falls (HF rounds before the weight multiply).
"""

import logging

import torch

logger = logging.getLogger(__name__)

RMS_NORM_CLASSES = frozenset({"Qwen3RMSNorm", "Qwen3VLTextRMSNorm", "Qwen3MoeRMSNorm", "Qwen2RMSNorm",
                              "LlamaRMSNorm", "MistralRMSNorm"})
"""HF classes computing weight * x / rms(x) (not Gemma's (1 + weight) form): safe to replace."""


class FusedRMSNorm(torch.nn.Module):
    """weight * x / sqrt(mean(x^2) + eps) through torch.nn.functional.rms_norm; adopts the
    replaced module's weight Parameter, so parameter names are unchanged."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.eps = float(norm.variance_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Replace every known RMSNorm of `model` by FusedRMSNorm; returns how many were replaced."""
    targets = [(name, m) for name, m in model.named_modules() if type(m).__name__ in RMS_NORM_CLASSES]
    for name, norm in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, FusedRMSNorm(norm))
    if targets:
        logger.info("fused %d RMSNorm modules (torch.nn.functional.rms_norm)", len(targets))
    return len(targets)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules whose class HF lists in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """torch.compile each decoder layer's `forward` (dynamic shapes: packed lengths vary per micro-batch),
    and the per-chunk math of the model's LogprobHead (training/logprobs.py) when it has one.

    The forward method is compiled, not the module: hooks that FSDP2 and activation checkpointing put
    around the call stay in eager mode, so sharding and recomputation work as without compilation."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if hasattr(head, "compiled"):
        head.compiled = True
    if layers:
        logger.info("compiling %d decoder layers (torch.compile, dynamic shapes)", len(layers))
    return len(layers)
