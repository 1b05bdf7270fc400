"""Scoring one group's responses, with reward errors counted instead of passed on.

A reward error is a reward function that raised, returned something that is not a number, or
returned NaN/inf. It never reaches the advantages: under the `drop` policy the sample leaves
its group, under `zero` it is scored 0. Either way it is counted (rollout/reward_errors) and
the first errors are logged with the sample's prompt id.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from verl_async.config.data import REWARD_ERROR_POLICIES

logger = logging.getLogger(__name__)


@dataclass
class GroupScores:
    """Invariant: len(rewards) == number of responses; None marks a dropped sample; every float is finite."""

    rewards: list[float | None]
    errors: list[str] = field(default_factory=list)  # one description per reward error

    @property
    def kept(self) -> list[float]:
        return [r for r in self.rewards if r is not None]


def score_group(reward_fn, texts: list[str | None], ground_truth: str, extra_info: dict[str, Any],
                policy: str) -> GroupScores:
    """Score every response; a reward error becomes None (`drop`) or 0.0 (`zero`). A text of None (a
    multi-turn episode cut by its budget: no final answer) scores 0.0 without calling reward_fn."""
    if policy not in REWARD_ERROR_POLICIES:
        raise ValueError(f"reward error policy {policy!r}: use one of {', '.join(REWARD_ERROR_POLICIES)}")
    rewards: list[float | None] = []
    errors: list[str] = []
    for text in texts:
        if text is None:
            rewards.append(0.0)
            continue
        try:
            value = float(reward_fn(text, ground_truth, extra_info))
        except Exception as e:  # a user's reward function: any failure is a counted reward error
            value, problem = None, f"raised {type(e).__name__}: {e}"
        else:
            problem = None if math.isfinite(value) else f"returned {value}"
        if problem is None:
            rewards.append(value)
            continue
        errors.append(problem)
        rewards.append(None if policy == "drop" else 0.0)
    return GroupScores(rewards, errors)
