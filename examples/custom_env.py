"""A custom environment: a search tool over the facts each row carries (see custom_dataset.py).

An environment is a class with two coroutines: `start(row)` begins an episode, `step(turn)`
answers one model turn with an `EnvStep` (an observation, a reward contribution, done). One
instance runs one episode; constructor arguments come from `data.env.args` and are checked
against the signature at start-up. The text observation is rendered as a `tool` message with
the model's chat template, and its tokens are never trained on (loss mask 0).

    python examples/custom_dataset.py /tmp/cities.jsonl
    verl-async data.train_files=[/tmp/cities.jsonl] data.max_prompt_length=128 \\
        data.reward_fn=examples/custom_reward.py:fuzzy_match \\
        data.env.name=examples/custom_env.py:SearchEnv +data.env.args.top_k=2 data.env.max_turns=2

(`+` adds a key that data.env.args does not have yet; plain `key=value` changes one it has.)
"""

import re

from verl_async.envs import EnvStep, ModelTurn
from verl_async.types import PromptRow

_WORD = re.compile(r"[a-z]+")


class SearchEnv:
    """Every turn before the last allowed query is a search; the turn after it is the answer."""

    def __init__(self, max_queries: int = 1, top_k: int = 1):
        if max_queries < 0 or top_k < 1:
            raise ValueError(f"SearchEnv: max_queries={max_queries} must be >= 0 and top_k={top_k} >= 1")
        self.max_queries = max_queries
        self.top_k = top_k
        self.facts: list[str] = []
        self.queries = 0

    async def start(self, row: PromptRow) -> None:
        self.facts = list(row.extra_info["facts"])  # a KeyError here fails this episode, counted
        self.queries = 0

    async def step(self, turn: ModelTurn) -> EnvStep:
        if self.queries >= self.max_queries:
            return EnvStep(done=True)  # scored by data.reward_fn
        self.queries += 1
        words = set(_WORD.findall(turn.text.lower()))
        ranked = sorted(self.facts, key=lambda fact: -len(words & set(_WORD.findall(fact.lower()))))
        return EnvStep(observation="\n".join(ranked[: self.top_k]))
