"""Rewards: pure functions (response text, ground truth, extra info) -> float, in an explicit registry.

A custom reward is named by import path `package.module:function` in `data.reward_fn`.
"""

import importlib
from collections.abc import Callable
from typing import Any

from verl_async.rewards.colours import colours_reward
from verl_async.rewards.digits import digits_reward
from verl_async.rewards.geometry import geometry_reward
from verl_async.rewards.math import gsm8k_reward

RewardFn = Callable[[str, str, dict[str, Any]], float]

REWARDS: dict[str, RewardFn] = {
    "digits": digits_reward,
    "gsm8k": gsm8k_reward,
    "geometry": geometry_reward,  # geo3k: final answer checked by math-verify
    "colours": colours_reward,  # the generated VL task
}


def resolve_reward(name: str) -> RewardFn:
    """A registry name, or `module:function`; fails at startup with how to fix it."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"data.reward_fn={name!r} cannot be imported ({e}); check the module path.") from e
        if not callable(fn):
            raise ValueError(f"data.reward_fn={name!r} is not callable.")
        return fn
    raise ValueError(f"data.reward_fn={name!r} is unknown: use one of {', '.join(REWARDS)} or `module:function`.")
