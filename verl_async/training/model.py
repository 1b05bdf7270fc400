"""Build the trained HF model (FSDP2 or replicated), run it on a MicroBatch, read its full weights.

FSDP2 (`fully_shard`, one unit per decoder layer plus the root) is used on GPU (nccl) and
on CPU (gloo) alike, so both devices run the same code: fp32 master weights, compute in
model.dtype through FSDP2's MixedPrecisionPolicy. With trainer.fsdp=False the module is
replicated and the worker all-reduces gradients itself (compute under autocast). The output
layer is a LogprobHead (training/logprobs.py): the trainer never materialises full logits.
"""

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from functools import partial

import torch
from torch.distributed.tensor import DTensor

from verl_async.config.model import ModelConfig
from verl_async.training.attention import VARLEN_IMPLEMENTATION, register_varlen_attention
from verl_async.training.batching import MicroBatch
from verl_async.training.kernels import compile_decoder_layers, decoder_layers, fuse_rms_norms
from verl_async.training.logprobs import LogprobQuery, install_logprob_head

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf_model(model_path: str, cfg: ModelConfig, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The HF model in fp32 on CPU, its output layer a LogprobHead. Configs with a vision tower
    load through the image-text class."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    if attn_implementation == VARLEN_IMPLEMENTATION:
        register_varlen_attention()
    hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    auto = AutoModelForImageTextToText if "vision_config" in hf_config.to_dict() else AutoModelForCausalLM
    model = auto.from_pretrained(model_path, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code,
                                 attn_implementation=attn_implementation)
    model.config.use_cache = False
    install_logprob_head(model)
    return model


def build_model(model_path: str, cfg: ModelConfig, device: torch.device, fsdp: bool, trainable: bool,
                layout: str = "padded", fused_norms: bool = False, compile_layers: bool = False) -> torch.nn.Module:
    """Load, optionally checkpoint activations, shard (fsdp) or move to `device`. `layout`
    (training/attention.py) picks the attention: varlen for packed rows, sdpa for padded ones;
    `fused_norms` swaps RMSNorms for torch's fused kernel, `compile_layers` compiles each decoder
    layer's forward (training/kernels.py).
    A non-trainable model (the KL reference) is frozen and kept in eval mode."""
    model = load_hf_model(model_path, cfg, VARLEN_IMPLEMENTATION if layout == "packed" else "sdpa")
    if fused_norms:
        fuse_rms_norms(model)
    if compile_layers:
        compile_decoder_layers(model)
    if trainable and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not trainable:
        model.requires_grad_(False)
    elif cfg.freeze_vision_tower:
        freeze_vision_tower(model)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        compute = DTYPES[cfg.dtype]
        mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute != torch.float32 else None
        kwargs = {"mesh": mesh} | ({"mp_policy": mp} if mp is not None else {})
        blocks = decoder_layers(model)
        if not blocks:
            logger.warning("no %s blocks found: FSDP2 shards the whole model as one unit",
                           sorted(model._no_split_modules or ()))
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
    else:
        model.to(device)
    model.train(trainable)
    return model


def freeze_vision_tower(model: torch.nn.Module) -> None:
    """model.freeze_vision_tower: the vision tower is not trained, so syncs never send it."""
    from verl_async.sync.names import VISION_TOWER_PREFIXES

    tower = [p for name, p in model.named_parameters() if name.startswith(VISION_TOWER_PREFIXES)]
    if not tower:
        raise ValueError(f"model.freeze_vision_tower=true, but the model has no {VISION_TOWER_PREFIXES} "
                         "parameters: set it to false for a text model.")
    for p in tower:
        p.requires_grad_(False)
    logger.info("vision tower frozen: %.1fM parameters", sum(p.numel() for p in tower) / 1e6)


def vision_token_inputs(config, mb: MicroBatch) -> dict[str, torch.Tensor]:
    """Qwen-VL inputs derived from the token ids. mm_token_type_ids (1 image slot, 2 video slot): the
    model builds its multimodal rotary positions from them. A vision pad token in a response is fed
    as padding: only the prompt's slots hold images (the rollout stops at such a token, so it is the
    last one and no trained log-prob depends on its input)."""
    ids = mb.input_ids.clone()
    flat = ids.view(-1)
    response_pos = mb.logits_index + 1
    pads = torch.tensor([config.image_token_id, config.video_token_id], device=ids.device)
    flat[response_pos[torch.isin(flat[response_pos], pads)]] = config.get_text_config().pad_token_id or 0
    types = (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()
    return {"input_ids": ids, "mm_token_type_ids": types}


def token_logprobs(model: torch.nn.Module, mb: MicroBatch, temperature: float, entropy: str = "none",
                   autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens under `model`, as [R, T] (zeros at padding).

    logits are divided by the sampling temperature (vLLM's processed_logprobs do the same).
    entropy: "none", "no_grad" (metric only) or "grad" (an entropy bonus is trained on).
    The model's LogprobHead computes both in chunks from the hidden states.
    """
    kwargs = {"input_ids": mb.input_ids, "use_cache": False, **mb.extra_inputs}
    if "image_grid_thw" in mb.extra_inputs:  # Qwen-VL rows (padded layout: the model derives mrope positions)
        kwargs |= vision_token_inputs(model.config, mb)
    if mb.packed:
        kwargs |= {"position_ids": mb.position_ids, "cu_seq_lens_q": mb.cu_seq_lens, "cu_seq_lens_k": mb.cu_seq_lens,
                   "max_length_q": mb.max_seq_len, "max_length_k": mb.max_seq_len}
    elif mb.attention_mask is not None:
        kwargs["attention_mask"] = mb.attention_mask
    cast = (torch.autocast(mb.input_ids.device.type, dtype=autocast_dtype) if autocast_dtype is not None
            else contextlib.nullcontext())
    query = LogprobQuery(index=mb.logits_index, targets=mb.targets, temperature=temperature,
                         with_entropy=entropy != "none")
    with cast, model.get_output_embeddings().query(query):
        per_token = model(**kwargs).logits  # [N, 2]: log-prob, entropy
    out = per_token.new_zeros(mb.response_mask.shape)
    out[mb.response_mask] = per_token[:, 0]
    if entropy == "none":
        return out, None
    ent_flat = per_token[:, 1] if entropy == "grad" and torch.is_grad_enabled() else per_token[:, 1].detach()
    ent = ent_flat.new_zeros(mb.response_mask.shape)
    ent[mb.response_mask] = ent_flat
    return out, ent


def full_tensors(model: torch.nn.Module, dtype: torch.dtype, rank: int, include_frozen: bool,
                 timer: list[float] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor in `dtype`) for each parameter, tied weights once. Every rank must
    iterate (FSDP2 all-gathers each sharded tensor); only rank 0 yields. Time spent gathering
    is added to timer[0]."""
    for name, param in model.named_parameters():
        if not (param.requires_grad or include_frozen):
            continue  # frozen weights (e.g. a fixed vision tower) never change on the engines
        start = time.perf_counter()
        full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        if timer is not None:
            timer[0] += time.perf_counter() - start
        if rank == 0:
            yield name, full.detach().to(dtype).contiguous()


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    warm-up: (step + 1) / warmup_steps for step < warmup_steps; then with
    p = (step - warmup_steps) / max(1, total_steps - warmup_steps):
    constant: 1;  linear: 1 - p;  cosine: (1 + cos(pi * p)) / 2.  Never below 0.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, schedule: str):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule))
