"""Rewards: pure functions (response text, ground truth, extra info) -> float, in an explicit registry.

A custom reward is named by import path `package.module:function` or by file
`path/to/file.py:function` in `data.reward_fn`.
"""

from collections.abc import Callable
from typing import Any

from verl_async.plugins import load_object
from verl_async.rewards.colours import colours_reward
from verl_async.rewards.digits import digits_reward
from verl_async.rewards.geometry import geometry_reward
from verl_async.rewards.math import gsm8k_reward

RewardFn = Callable[[str, str, dict[str, Any]], float]


def no_reward(response: str, ground_truth: str, extra_info: dict[str, Any]) -> float:
    """0.0 for every answer: the environment's rewards are the whole score (multi-turn)."""
    return 0.0


REWARDS: dict[str, RewardFn] = {
    "digits": digits_reward,
    "gsm8k": gsm8k_reward,
    "geometry": geometry_reward,  # geo3k: final answer checked by math-verify
    "colours": colours_reward,  # the generated VL task
    "none": no_reward,  # multi-turn: scored by the environment alone
}


def resolve_reward(name: str) -> RewardFn:
    """A registry name, `module:function` or `file.py:function`; fails at startup with how to fix it."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        fn = load_object(name, "data.reward_fn")
        if not callable(fn):
            raise ValueError(f"data.reward_fn={name!r} is not callable.")
        return fn
    raise ValueError(f"data.reward_fn={name!r} is unknown: use one of {', '.join(REWARDS)} or `module:function`.")
