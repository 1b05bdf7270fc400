"""The calculator task: a generated tool-use task the tiny model can learn on CPU in minutes.

The prompt asks for the sum of two numbers and offers a calculator. A model turn that contains
integers is a calculator call: the tool adds them up and answers as a `tool` message. A turn
without integers, or the turn after the last allowed call, is the final answer, scored by
data.reward_fn (configs/data/calculator.yaml: `digits`, the share of digits plus 0.5 for the
exact sum). A call with exactly the two numbers of the question earns `call_reward`.
"""

import random
import re

from verl_async.envs.base import EnvStep, ModelTurn
from verl_async.types import PromptRow

_INTEGER = re.compile(r"\d{1,6}")
_TEMPLATES = [
    "What is {a} plus {b}? Call the calculator with the numbers, then answer in digits only.",
    "Add {a} and {b}. You may write the numbers for the calculator first. Reply with digits.",
    "Use the calculator: {a} + {b}. Then write only the number.",
]


def calculator_task(num_prompts: int, seed: int) -> list[PromptRow]:
    """Rows of the calculator task: ground_truth is the sum, extra_info.operands the two numbers."""
    rng = random.Random(seed + 3)
    rows = []
    for i in range(num_prompts):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        text = rng.choice(_TEMPLATES).format(a=a, b=b)
        rows.append(PromptRow(prompt_id=f"calculator-{seed}-{i}", messages=[{"role": "user", "content": text}],
                              ground_truth=str(a + b), extra_info={"operands": [a, b]},
                              data_source="calculator"))
    return rows


class CalculatorEnv:
    """One calculator per episode. `max_calls` tool calls at most; `max_operands` numbers per call."""

    def __init__(self, max_calls: int = 1, call_reward: float = 0.25, max_operands: int = 4):
        if max_calls < 0 or max_operands < 1:
            raise ValueError(f"CalculatorEnv: max_calls={max_calls} must be >= 0 and max_operands={max_operands} >= 1")
        self.max_calls = max_calls
        self.call_reward = call_reward
        self.max_operands = max_operands
        self.calls = 0
        self.operands: list[int] = []

    async def start(self, row: PromptRow) -> None:
        self.calls = 0
        self.operands = sorted(int(x) for x in row.extra_info.get("operands", []))

    async def step(self, turn: ModelTurn) -> EnvStep:
        numbers = [int(x) for x in _INTEGER.findall(turn.text)][: self.max_operands]
        if self.calls >= self.max_calls or not numbers:
            return EnvStep(done=True)  # this turn is the final answer
        self.calls += 1
        reward = self.call_reward if sorted(numbers) == self.operands else 0.0
        return EnvStep(observation=f"{' + '.join(map(str, numbers))} = {sum(numbers)}", reward=reward)
