"""Reward for geometry QA (geo3k layout): the final answer checked for mathematical equality.

math-verify (Hugging Face's maintained checker: LaTeX/expression parsing into SymPy, numeric
tolerance, units and \\boxed{} handling) compares the model's final answer with the ground truth,
so 2\\sqrt{3}, \\sqrt{12} and 2*sqrt(3) are one answer. Only the answer's tail is parsed: the
last \\boxed{...} if there is one, else the last few hundred characters.
"""

import logging
import threading
from typing import Any

TAIL_CHARS = 300
PARSE_TIMEOUT_S = 5


def final_answer_span(response: str) -> str:
    """From the last \\boxed{ to the end (capped), else the response's tail."""
    start = response.rfind("\\boxed")
    if start >= 0:
        return response[start:start + TAIL_CHARS]
    return response[-TAIL_CHARS:]


def _math_verify():
    try:
        import math_verify
    except ImportError as e:
        raise ImportError("the geometry reward needs math-verify: pip install 'math-verify[antlr4_9_3]'") from e
    # With the timeouts off (see below) it warns on every call; its real errors stay visible.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


def geometry_reward(response: str, ground_truth: str, extra_info: dict[str, Any]) -> float:
    """1.0 when the final answer equals the ground truth (math-verify), else 0.0."""
    if not response.strip() or not ground_truth.strip():
        return 0.0
    mv = _math_verify()
    # math-verify's timeouts use SIGALRM, which only the main thread may set; rewards run on
    # worker threads, where the parsed span is bounded instead (TAIL_CHARS).
    timeout = PARSE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold_text = ground_truth if "$" in ground_truth or "\\boxed" in ground_truth else f"${ground_truth}$"
    gold = mv.parse(gold_text, parsing_timeout=timeout)
    answer = mv.parse(final_answer_span(response), parsing_timeout=timeout)
    if not gold or not answer:
        return 0.0
    return 1.0 if mv.verify(gold, answer, timeout_seconds=timeout) else 0.0
