"""Reward for the generated digits task."""

from typing import Any


def digits_reward(response: str, ground_truth: str, extra_info: dict[str, Any]) -> float:
    """Share of non-space characters that are digits (0 for an empty answer), +0.5 bonus for the exact sum."""
    chars = [c for c in response if not c.isspace()]
    if not chars:
        return 0.0
    share = sum(c.isdigit() for c in chars) / len(chars)
    exact = 0.5 if ground_truth and response.strip() == ground_truth else 0.0
    return share + exact
