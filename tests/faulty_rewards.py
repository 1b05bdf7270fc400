"""Reward functions that misbehave on purpose, named by import path (`tests.faulty_rewards:...`) in
data.reward_fn: the rollouter (a Ray actor) imports them from the repository root, its working dir."""

from verl_async.rewards.digits import digits_reward


def nan_sometimes(response: str, ground_truth: str, extra_info: dict) -> float:
    """NaN for one response in five (by length), a raise for the rows asking for it, else the digits reward."""
    if ground_truth == "raise":
        raise ValueError("this row's reward always fails")
    if len(response) % 5 == 0:
        return float("nan")
    return digits_reward(response, ground_truth, extra_info)
