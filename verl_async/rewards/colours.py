"""Reward for the generated colours task (VL): name the colour of a solid image."""

import re
from typing import Any

from verl_async.data.tasks import COLOURS

_WORD = re.compile(r"[a-z]+")


def colours_reward(response: str, ground_truth: str, extra_info: dict[str, Any]) -> float:
    """1.0 when the first colour word of the answer is the image's colour, 0.25 when it names
    another colour (the answer has the right form), 0.0 when it names none."""
    for word in _WORD.findall(response.lower()):
        if word in COLOURS or word == "grey":
            return 1.0 if word == ground_truth else 0.25
    return 0.0
