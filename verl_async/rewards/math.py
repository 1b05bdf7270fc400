"""Rule-based math answer rewards (GSM8K-style final numbers)."""

import re
from typing import Any

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _normalise(num: str) -> str:
    num = num.replace(",", "").rstrip(".")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return num


def extract_final_number(text: str) -> str | None:
    """The answer after '####' if present, else the last number in a \\boxed{}, else the last number."""
    if "####" in text:
        tail = text.split("####")[-1]
        m = _NUMBER.search(tail)
        return _normalise(m.group()) if m else None
    boxed = re.findall(r"\\boxed\{([^}]*)\}", text)
    for candidate in reversed(boxed):
        m = _NUMBER.search(candidate)
        if m:
            return _normalise(m.group())
    nums = _NUMBER.findall(text)
    return _normalise(nums[-1]) if nums else None


def gsm8k_reward(response: str, ground_truth: str, extra_info: dict[str, Any]) -> float:
    """1.0 when the final number equals the ground truth's final number, else 0.0."""
    want = extract_final_number(ground_truth)
    got = extract_final_number(response)
    return 1.0 if want is not None and got == want else 0.0
