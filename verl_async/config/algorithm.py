"""The RL objective: advantages, policy loss and off-policy corrections."""

from dataclasses import dataclass

from verl_async.config._check import check, check_choice

ADVANTAGES = ("grpo", "drgrpo")
POLICY_LOSSES = ("ppo", "decoupled_ppo")
IS_CORRECTIONS = ("none", "tis", "mis")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean")


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"
    """grpo: (r - mean) / std within a group; drgrpo: r - mean (no std scaling)."""
    drop_zero_variance_groups: bool = True
    """Dynamic sampling: drop groups whose rewards are all equal (they carry no signal); counted."""
    policy_loss: str = "decoupled_ppo"
    """ppo: clip against the behaviour policy; decoupled_ppo: clip against a proximal policy recomputed by the trainer."""
    clip_ratio_low: float = 0.2
    """PPO clip: ratio >= 1 - clip_ratio_low."""
    clip_ratio_high: float = 0.28
    """PPO clip: ratio <= 1 + clip_ratio_high (clip-higher when above clip_ratio_low)."""
    is_correction: str = "tis"
    """Behaviour-vs-proximal importance weight: none, tis (truncate at is_threshold) or mis (mask tokens above it)."""
    is_threshold: float = 2.0
    """Cap for TIS / mask threshold for MIS."""
    loss_agg: str = "token_mean"
    """token_mean: mean over all tokens of the batch; seq_mean: mean over sequences of their token mean."""
    kl_coef: float = 0.0
    """Weight of a KL penalty to the reference (initial) model; 0 keeps no reference model."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (the entropy is always reported)."""

    def __post_init__(self) -> None:
        check_choice("algorithm.advantage", self.advantage, ADVANTAGES)
        check_choice("algorithm.policy_loss", self.policy_loss, POLICY_LOSSES)
        check_choice("algorithm.is_correction", self.is_correction, IS_CORRECTIONS)
        check_choice("algorithm.loss_agg", self.loss_agg, LOSS_AGGREGATIONS)
        check(0.0 <= self.clip_ratio_low < 1.0, "algorithm.clip_ratio_low", self.clip_ratio_low, "use a value in [0, 1).")
        check(self.clip_ratio_high >= 0.0, "algorithm.clip_ratio_high", self.clip_ratio_high, "use 0 or more.")
        check(self.is_threshold > 1.0, "algorithm.is_threshold", self.is_threshold, "use a value above 1, e.g. 2.0.")
        check(self.kl_coef >= 0.0, "algorithm.kl_coef", self.kl_coef, "use 0 or more.")
