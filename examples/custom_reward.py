"""A custom reward: a plain function (response text, ground truth, extra_info) -> float.

Name it by file, `data.reward_fn=examples/custom_reward.py:fuzzy_match`, or by import path
(`package.module:function`) when it lives in an installed package. It runs in the rollouter,
off the event loop; it must return a finite number. With a multi-turn environment it scores
the final model turn of each episode the environment ended.
"""

from difflib import SequenceMatcher
from typing import Any


def fuzzy_match(response: str, ground_truth: str, extra_info: dict[str, Any]) -> float:
    """1.0 when the answer contains the ground truth (case-insensitive); else partial credit,
    half the similarity of the answer to it (so a group of wrong answers still ranks)."""
    answer, truth = response.strip().lower(), ground_truth.strip().lower()
    if truth and truth in answer:
        return 1.0
    return 0.5 * SequenceMatcher(None, answer, truth).ratio()
