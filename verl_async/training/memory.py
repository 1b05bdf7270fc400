"""Will the trainer fit beside the rollout engine on a shared GPU? An estimate, a check, a cap.

The estimate (pure, `estimate_trainer_memory`) counts, in bytes:
    model states   trainable params x 16 (fp32 weights 4, fp32 grads 4, AdamW m and v 8),
                   frozen params x 4, all params x the compute dtype's size (the bf16 copy FSDP2's
                   mixed precision or autocast computes with); the KL reference model x 4
    activations    micro_batch_max_tokens x (per token and decoder layer: what a Qwen-style HF layer
                   saves for backward, below) x layers; with gradient checkpointing only each layer's
                   input is kept, plus one layer's activations while it is recomputed
    log-probs      a fixed workspace, whatever the micro-batch: the chunked log-prob head
                   (training/logprobs.py) holds a few chunk x vocab fp32 buffers and, in the
                   backward, an fp32 gradient of the output layer (vocab x hidden x 4)
    staging        the ipc weight-sync buffers (sync.bucket_bytes each)
No attention mask is built (packed rows run varlen attention, padded text rows causal sdpa) and
no L^2 attention weights are saved. It is an upper-leaning estimate for HF Qwen/Llama-style models.

The check runs in the trainer process once the engine is up, before the model is built: it
compares the estimate with the GPU memory actually free, minus what the engine needs beyond its
own share during a sync (its copy of one bucket) and what the trainer holds outside its caching
allocator. Then it caps the trainer's allocator there, so the trainer can run out of memory
itself but never take the engine's.
"""

import logging
import math
from dataclasses import dataclass

from verl_async.config._check import ConfigError

logger = logging.getLogger(__name__)

GiB = 1 << 30
STATE_BYTES = 16  # per trainable param: fp32 weight, fp32 grad, AdamW exp_avg and exp_avg_sq
FROZEN_BYTES = 4  # per frozen param, and per param of the KL reference model: fp32 weight
UNTRACKED_BYTES = 1 * GiB  # trainer memory outside its caching allocator: CUDA context, NCCL, cuBLAS
ENGINE_LAYER_BYTES = GiB // 2  # the engine's layer buffers while a sync reloads its weights
COMPUTE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class MemoryCheckError(ConfigError):
    """The trainer would not fit beside the engine. The message says what to lower."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model (read from its HF config, no weights)."""

    params: int  # all parameters, tied ones once
    trainable_params: int
    layers: int
    hidden: int
    q_dim: int  # attention heads x head_dim
    kv_dim: int  # key-value heads x head_dim
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class TrainerMemory:
    """The estimate, in bytes, and what it was made for."""

    states: int
    reference: int
    activations: int
    logits: int  # the log-prob workspace
    staging: int
    micro_batch_tokens: int
    gradient_checkpointing: bool
    per_token: int  # activations per token (what micro_batch_max_tokens scales)
    fixed: int  # everything that does not scale with it

    @property
    def total(self) -> int:
        return self.states + self.reference + self.activations + self.logits + self.staging

    def describe(self) -> str:
        ckpt = "with" if self.gradient_checkpointing else "without"
        parts = [f"model states {_gib(self.states)}", f"activations {_gib(self.activations)} "
                 f"({self.micro_batch_tokens} tokens {ckpt} gradient checkpointing)",
                 f"log-prob workspace {_gib(self.logits)}",
                 f"weight-sync staging {_gib(self.staging)}"]
        if self.reference:
            parts.insert(1, f"KL reference model {_gib(self.reference)}")
        return f"{_gib(self.total)} ({', '.join(parts)})"


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def layer_activation_bytes(shape: ModelShape, compute_bytes: int) -> int:
    """Bytes one token leaves saved for backward in one decoder layer (HF Qwen/Llama-style, SDPA).

    Two RMSNorms keep their fp32 input and normalised output; q/k norms the same over q and kv; attention
    keeps q, k, v, the rotary intermediates, k/v repeated to all heads (GQA), the SDPA output and the
    o_proj input; the gated MLP keeps gate, up, the activation and the product.
    """
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    norms = 2 * (4 * h + compute_bytes * h) + (4 + compute_bytes) * (q + kv)
    attention = compute_bytes * (7 * q + 4 * kv)
    mlp = compute_bytes * 4 * i
    return norms + attention + mlp


def estimate_trainer_memory(shape: ModelShape, *, compute_dtype: str, micro_batch_tokens: int,
                            gradient_checkpointing: bool, reference_model: bool, staging_bytes: int) -> TrainerMemory:
    cb = COMPUTE_BYTES[compute_dtype]
    copy = shape.params * cb if cb < 4 else 0  # fp32 compute needs no second copy
    states = shape.trainable_params * STATE_BYTES + (shape.params - shape.trainable_params) * FROZEN_BYTES + copy
    reference = shape.params * FROZEN_BYTES if reference_model else 0
    layer = layer_activation_bytes(shape, cb)
    per_token_act = shape.layers * cb * shape.hidden + layer if gradient_checkpointing else shape.layers * layer
    logits = logprob_workspace(shape)
    tokens = micro_batch_tokens
    return TrainerMemory(
        states=states, reference=reference, activations=tokens * per_token_act, logits=logits,
        staging=staging_bytes, micro_batch_tokens=tokens, gradient_checkpointing=gradient_checkpointing,
        per_token=per_token_act, fixed=states + reference + logits + staging_bytes)


def logprob_workspace(shape: ModelShape) -> int:
    """The chunked log-prob head's peak: four chunk-sized fp32 buffers (logits, log-softmax, probabilities,
    their gradient) and the output layer's fp32 gradient accumulator."""
    from verl_async.training.logprobs import chunk_tokens

    return 4 * chunk_tokens(shape.vocab) * shape.vocab * 4 + shape.vocab * shape.hidden * 4


def staging_bytes(shape: ModelShape, compute_dtype: str, bucket_bytes: int) -> int:
    """The ipc sender's staging buffers: one per bucket the weights need, at most ipc.NUM_BUFFERS."""
    from verl_async.sync.ipc import NUM_BUFFERS

    buckets = math.ceil(shape.trainable_params * COMPUTE_BYTES[compute_dtype] / bucket_bytes)
    return min(NUM_BUFFERS, max(buckets, 1)) * bucket_bytes


def trainer_budget(free_bytes: int, bucket_bytes: int) -> int:
    """What the trainer may allocate: the free memory it measured (the engine already holds its share),
    less the engine's copy of one bucket and a layer's buffers during a sync, less what the trainer
    holds outside its allocator."""
    return free_bytes - bucket_bytes - ENGINE_LAYER_BYTES - UNTRACKED_BYTES


def max_tokens(need: TrainerMemory, budget: int) -> int:
    """The largest micro-batch whose estimate fits `budget`: fixed + t * per_token <= budget."""
    room = budget - need.fixed
    return max(room // need.per_token, 0) if room > 0 else 0


def check_fits(need: TrainerMemory, budget: int, *, total_bytes: int, engine_fraction: float) -> None:
    """Raise MemoryCheckError, saying what to lower, when `need` exceeds `budget`."""
    if need.total <= budget:
        return
    fixes = []
    if budget > need.fixed:
        fixes.append(f"lower trainer.micro_batch_max_tokens to {max_tokens(need, budget)} or less "
                     f"(now {need.micro_batch_tokens})")
    if not need.gradient_checkpointing:
        fixes.append("set model.gradient_checkpointing=true")
    spare = math.floor((engine_fraction - (need.total - budget) / total_bytes) * 100) / 100
    if spare >= 0.05:
        fixes.append(f"lower rollout.gpu_memory_utilization to {spare:.2f} or less (now {engine_fraction:g})")
    fixes += ["use a smaller model, or give rollout and trainer GPUs of their own (cluster=gpu_1x2)"]
    raise MemoryCheckError(
        f"the trainer needs about {need.describe()}, but only {_gib(budget)} of the GPU's {_gib(total_bytes)} "
        f"is left beside the rollout engine (rollout.gpu_memory_utilization={engine_fraction:g}) and its "
        f"weight-sync headroom. To fit: " + "; ".join(fixes) + ". cluster.memory_check=false skips this estimate.")


def model_shape(model_path: str, *, trust_remote_code: bool = False, freeze_vision_tower: bool = False) -> ModelShape:
    """The shape of the model at `model_path`, from its config and a meta-device skeleton (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from verl_async.sync.names import VISION_TOWER_PREFIXES

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    auto = AutoModelForImageTextToText if "vision_config" in config.to_dict() else AutoModelForCausalLM
    with torch.device("meta"):
        skeleton = auto.from_config(config, trust_remote_code=trust_remote_code)
    named = list(skeleton.named_parameters())  # a tied weight appears once
    params = sum(p.numel() for _, p in named)
    frozen = sum(p.numel() for n, p in named if n.startswith(VISION_TOWER_PREFIXES)) if freeze_vision_tower else 0
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads  # HF configs only have what they declare
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return ModelShape(params=params, trainable_params=params - frozen, layers=text.num_hidden_layers,
                      hidden=text.hidden_size, q_dim=heads * head_dim, kv_dim=kv_heads * head_dim,
                      intermediate=text.intermediate_size, vocab=text.vocab_size)


@dataclass(frozen=True)
class SharedGpuPlan:
    """What a trainer worker checks and caps before it builds anything on a GPU it shares with an engine."""

    need: TrainerMemory | None  # None: cluster.memory_check=false (cap only)
    bucket_bytes: int  # sync.bucket_bytes: the engine's copy of one bucket during a sync
    engine_fraction: float  # rollout.gpu_memory_utilization


def plan_shared_gpu(model_path: str, model, trainer, algorithm, sync, cluster, rollout) -> SharedGpuPlan:
    """The estimate for this job's trainer (config slices: model, trainer, algorithm, sync, cluster, rollout)."""
    need = None
    if cluster.memory_check:
        shape = model_shape(model_path, trust_remote_code=model.trust_remote_code,
                            freeze_vision_tower=model.freeze_vision_tower)
        need = estimate_trainer_memory(
            shape, compute_dtype=model.dtype, micro_batch_tokens=trainer.micro_batch_max_tokens,
            gradient_checkpointing=model.gradient_checkpointing, reference_model=algorithm.kl_coef > 0,
            staging_bytes=staging_bytes(shape, model.dtype, sync.bucket_bytes))
        logger.info("shared GPU: the trainer needs about %s", need.describe())
    return SharedGpuPlan(need=need, bucket_bytes=sync.bucket_bytes, engine_fraction=rollout.gpu_memory_utilization)


def guard_shared_gpu(plan: SharedGpuPlan) -> dict[str, float]:
    """In the trainer process, before the model is built: check the estimate against the memory the engine
    left free, then cap this process's caching allocator at that budget. Returns what it measured."""
    import torch

    device = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(device)
    budget = trainer_budget(free, plan.bucket_bytes)
    if plan.need is not None:
        check_fits(plan.need, budget, total_bytes=total, engine_fraction=plan.engine_fraction)
    if budget <= 0:
        raise MemoryCheckError(f"only {_gib(free)} of the GPU's {_gib(total)} is free beside the rollout engine: "
                               "lower rollout.gpu_memory_utilization or sync.bucket_bytes.")
    torch.cuda.set_per_process_memory_fraction(budget / total, device)
    logger.info("shared GPU: %s free of %s after the engine started; the trainer's allocator is capped at %s",
                _gib(free), _gib(total), _gib(budget))
    return {"free_bytes": float(free), "total_bytes": float(total), "budget_bytes": float(budget),
            "need_bytes": float(plan.need.total if plan.need is not None else 0)}
