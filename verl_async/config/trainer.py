"""The trainer workers: optimisation, batching and checkpoints."""

from dataclasses import dataclass

from verl_async.config._check import check, check_choice


@dataclass
class TrainerConfig:
    num_workers: int = 1
    """Trainer processes (one per GPU; on CPU they form a gloo group)."""
    lr: float = 1e-6
    """AdamW peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warm-up length in optimizer steps."""
    lr_schedule: str = "constant"
    """After warm-up: constant, linear (to 0 at pipeline.total_steps) or cosine."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0: off)."""
    micro_batch_max_tokens: int = 8192
    """Token budget of one micro-batch (sequences are packed under it; gradients accumulate over micro-batches)."""
    attention: str = "auto"
    """Row layout and attention: packed (rows concatenated, padding-free varlen attention, cost sum(len^2);
    torch's FlashAttention varlen kernel on CUDA in bf16/fp16, a per-row sdpa loop elsewhere), padded
    (length-sorted right-padded rows on causal sdpa), or auto (packed where the varlen kernel runs, else padded).
    Vision-language rows are always padded."""
    fused_norms: bool = True
    """Run the model's RMSNorms through torch's fused rms_norm kernel (one kernel each way on CUDA
    instead of six; the same function up to bf16 rounding)."""
    fused_optimizer: bool = True
    """AdamW through torch's fused CUDA kernel (`fused=True`: one pass over all parameters per update
    instead of a foreach pass per operation). Off CUDA the foreach implementation runs."""
    compile_layers: bool = False
    """torch.compile each decoder layer's forward (dynamic shapes; inductor fuses rotary embeddings,
    SwiGLU, residual adds and casts). The first steps pay the compile time (tens of seconds a layer shape)."""
    mini_batches: int = 1
    """Optimizer updates per batch and epoch (the batch is split into this many mini-batches)."""
    ppo_epochs: int = 1
    """Passes over each batch."""
    fsdp: bool = True
    """Shard parameters with FSDP2 across trainer workers (nccl on GPU, gloo on CPU); False: replicate and all-reduce gradients."""
    checkpoint_every_steps: int = 0
    """Save a checkpoint every N optimizer steps (0: only at the end). A run that fails (a trainer rank died,
    too many non-finite updates) resumes from the newest one with `resume=true`: set it on long runs."""
    max_nonfinite_skips: int = 3
    """An optimizer update whose gradient norm is NaN/inf is skipped (counted as train/nonfinite_skips);
    this many skipped in a row stop the run with an error."""
    save_at_end: bool = True
    """Save a checkpoint and export the HF model when the run ends (false: benchmarks and throwaway runs)."""
    seed: int = 0
    """Trainer RNG seed."""

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "trainer.num_workers", self.num_workers, "use at least 1.")
        check(self.lr > 0, "trainer.lr", self.lr, "use a positive learning rate, e.g. 1e-6.")
        check(self.warmup_steps >= 0, "trainer.warmup_steps", self.warmup_steps, "use 0 or more.")
        check_choice("trainer.lr_schedule", self.lr_schedule, ("constant", "linear", "cosine"))
        check(self.max_grad_norm >= 0, "trainer.max_grad_norm", self.max_grad_norm, "use 0 (off) or a positive norm.")
        check(self.micro_batch_max_tokens > 0, "trainer.micro_batch_max_tokens", self.micro_batch_max_tokens,
              "use a positive token budget.")
        check_choice("trainer.attention", self.attention, ("auto", "packed", "padded"))
        check(self.mini_batches >= 1, "trainer.mini_batches", self.mini_batches, "use at least 1.")
        check(self.ppo_epochs >= 1, "trainer.ppo_epochs", self.ppo_epochs, "use at least 1.")
        check(self.checkpoint_every_steps >= 0, "trainer.checkpoint_every_steps", self.checkpoint_every_steps, "use 0 or more.")
        check(self.max_nonfinite_skips >= 1, "trainer.max_nonfinite_skips", self.max_nonfinite_skips, "use at least 1.")
