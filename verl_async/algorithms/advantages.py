"""Group-relative advantages (GRPO, Dr.GRPO) and the zero-variance test used by dynamic sampling.

Every sample of a prompt's group gets one scalar advantage, broadcast to all its tokens by
the trainer. Pure torch, no state.
"""

import math

import torch

ADVANTAGE_EPS = 1e-6
"""Added to the group std so that near-constant groups do not explode."""


def group_advantages(rewards: list[float], scale_by_std: bool = True, eps: float = ADVANTAGE_EPS) -> list[float]:
    """Advantages of one group of samples of the same prompt.

    GRPO (scale_by_std=True):     A_i = (r_i - mean(r)) / (std(r) + eps)
    Dr.GRPO (scale_by_std=False): A_i = r_i - mean(r)

    std is the unbiased sample std (as in DeepSeekMath's GRPO). A group of one sample has no
    baseline to compare with: its advantage is 0.
    """
    if not rewards:
        return []
    r = torch.tensor(rewards, dtype=torch.float64)
    if r.numel() == 1:
        return [0.0]
    centred = r - r.mean()
    if scale_by_std:
        centred = centred / (r.std(unbiased=True) + eps)
    return centred.tolist()


def compute_advantages(group_rewards: list[list[float]], method: str = "grpo") -> list[list[float]]:
    """Per-sample advantages for a list of groups (method: `grpo` or `drgrpo`, see AlgorithmConfig)."""
    if method not in ("grpo", "drgrpo"):
        raise ValueError(f"unknown advantage method {method!r}: use grpo or drgrpo")
    return [group_advantages(rewards, scale_by_std=method == "grpo") for rewards in group_rewards]


def is_zero_variance(rewards: list[float], tol: float = 0.0) -> bool:
    """True when all rewards of a group are equal (within `tol`): every advantage would be 0, so
    the group carries no gradient and dynamic sampling drops it. The rewards must be finite (a
    NaN makes max/min depend on the order): rewards.scoring takes reward errors out first."""
    if not all(math.isfinite(r) for r in rewards):
        raise ValueError(f"rewards {rewards} are not all finite: score them with rewards.scoring.score_group")
    if len(rewards) <= 1:
        return True
    return max(rewards) - min(rewards) <= tol
