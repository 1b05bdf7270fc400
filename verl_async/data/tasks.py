"""Generated tasks: learnable by a random tiny model within minutes, no download needed.

digits: "answer with digits only"; the reward is the share of digit characters in the
answer, so a random model starts near the vocabulary's digit share and RL moves it up.
"""

import random
from collections.abc import Callable

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


TASKS: dict[str, Callable[[int, int], list[PromptRow]]] = {"digits": digits_task}


def generate_task(name: str, num_prompts: int, seed: int) -> list[PromptRow]:
    if name not in TASKS:
        raise ValueError(f"data.generated_task={name!r} is unknown: choose one of {', '.join(TASKS)}.")
    return TASKS[name](num_prompts, seed)
