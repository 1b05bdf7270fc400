"""Generated tasks: learnable by a random tiny model within minutes, no download needed.

digits: "answer with digits only"; the reward is the share of digit characters in the
answer, so a random model starts near the vocabulary's digit share and RL moves it up.
colours (VL): name the colour of a solid image; needs a VL model (e.g. model.path=tiny-vl).
calculator (multi-turn): add two numbers with a calculator tool (verl_async/envs/calculator.py).
"""

import random
from collections.abc import Callable

from verl_async.envs.calculator import calculator_task
from verl_async.types import PromptRow

_TOPICS = ["apples", "birds", "chairs", "stars", "boats", "trees", "cups", "books", "coins", "doors"]


def digits_task(num_prompts: int, seed: int) -> list[PromptRow]:
    rng = random.Random(seed)
    rows = []
    for i in range(num_prompts):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        topic = rng.choice(_TOPICS)
        text = rng.choice([
            f"Reply with digits only. How many {topic} are {a} and {b}?",
            f"Count the {topic}: {a} then {b}. Answer in digits only.",
            f"Write only numbers. {a} {topic} and {b} more {topic}?",
        ])
        rows.append(PromptRow(prompt_id=f"digits-{seed}-{i}", messages=[{"role": "user", "content": text}],
                              ground_truth=str(a + b), data_source="digits"))
    return rows


def digits_longtail_task(num_prompts: int, seed: int, max_tokens: int = 256) -> list[PromptRow]:
    """The digits task with a long-tail per-prompt budget (extra_info.max_tokens, Pareto-distributed,
    capped at max_tokens): most answers are short, a few are long; the workload where synchronous RL
    waits on stragglers."""
    rng = random.Random(seed + 1)
    rows = digits_task(num_prompts, seed)
    for row in rows:
        row.extra_info["max_tokens"] = min(max_tokens, int(8 * rng.paretovariate(1.2)))
    return rows


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40),
           "black": (10, 10, 10), "white": (245, 245, 245)}


def colours_task(num_prompts: int, seed: int) -> list[PromptRow]:
    """VL: one solid-colour image (PNG bytes, 32-160 px a side, so vision-token counts vary) and
    "which colour is this image?"; the reward (rewards/colours.py) checks the colour named first."""
    from verl_async.data.vision import solid_png

    rng = random.Random(seed + 2)
    rows = []
    for i in range(num_prompts):
        name = rng.choice(sorted(COLOURS))
        size = (rng.choice(range(32, 161, 16)), rng.choice(range(32, 161, 16)))
        text = rng.choice(["What colour is this image? Answer with one word.",
                           "Name the colour of the image.", "Which colour is shown? Reply in one word."])
        rows.append(PromptRow(prompt_id=f"colours-{seed}-{i}", data_source="colours", ground_truth=name,
                              messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                              images=[solid_png(COLOURS[name], size)]))
    return rows


TASKS: dict[str, Callable[[int, int], list[PromptRow]]] = {
    "digits": digits_task, "digits_longtail": digits_longtail_task, "colours": colours_task,
    "calculator": calculator_task}


def generate_task(name: str, num_prompts: int, seed: int) -> list[PromptRow]:
    if name not in TASKS:
        raise ValueError(f"data.generated_task={name!r} is unknown: choose one of {', '.join(TASKS)}.")
    return TASKS[name](num_prompts, seed)
