"""Which model to train and serve."""

from dataclasses import dataclass

from verl_async.config._check import check, check_choice

ASSET_KINDS = ("tiny", "counter", "tiny-vl")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    path: str = "tiny"
    """A Hugging Face model folder, or a local asset name (tiny, counter, tiny-vl) built on first use."""
    assets_dir: str = "~/.cache/verl_async/assets"
    """Where locally built assets live (`verl-async-assets` writes here)."""
    dtype: str = "float32"
    """Weights dtype for the trainer's compute and the rollout engine (bfloat16 on GPU)."""
    trust_remote_code: bool = False
    """Allow model code from the model folder (needed by a few non-HF-native models)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    freeze_vision_tower: bool = False
    """VL models: keep the vision tower fixed (its weights are then never sent to the engines)."""

    def __post_init__(self) -> None:
        check(bool(self.path), "model.path", self.path, "set an HF folder or one of " + ", ".join(ASSET_KINDS))
        check_choice("model.dtype", self.dtype, DTYPES)

    @property
    def is_asset(self) -> bool:
        return self.path in ASSET_KINDS
