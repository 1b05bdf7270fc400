"""A scripted environment: it replays fixed observations, for tests and for debugging a workflow.

The script comes from the constructor (data.env.args) and may be overridden per row by
`extra_info["script"]` (same keys), so one dataset can mix episodes that end, run out of
turns, or fail.
"""

from typing import Any

from verl_async.envs.base import EnvStep, ModelTurn
from verl_async.types import PromptRow


class ScriptedEnv:
    """observations[k] answers model turn k (text or token ids; the last one repeats);
    rewards[k] is turn k's reward (0 past the end); the episode ends after turn `done_at_turn`
    (-1: never, it runs into data.env.max_turns); turn `fail_at_turn` raises (-1: never)."""

    def __init__(self, observations: list[Any] | None = None, rewards: list[float] | None = None,
                 done_at_turn: int = -1, fail_at_turn: int = -1):
        self.script = {"observations": list(observations or ["ok"]), "rewards": list(rewards or []),
                       "done_at_turn": done_at_turn, "fail_at_turn": fail_at_turn}
        self.turns: list[ModelTurn] = []  # every turn this episode saw, for tests

    async def start(self, row: PromptRow) -> None:
        override = row.extra_info.get("script") or {}
        unknown = set(override) - set(self.script)
        if unknown:
            raise ValueError(f"row {row.prompt_id}: unknown script keys {sorted(unknown)}; use {sorted(self.script)}")
        self.script = {**self.script, **override}
        self.turns = []

    async def step(self, turn: ModelTurn) -> EnvStep:
        s, k = self.script, turn.index
        self.turns.append(turn)
        if k == s["fail_at_turn"]:
            raise RuntimeError(f"scripted failure at turn {k}")
        reward = float(s["rewards"][k]) if k < len(s["rewards"]) else 0.0
        if k == s["done_at_turn"]:
            return EnvStep(reward=reward, done=True)
        observation = s["observations"][min(k, len(s["observations"]) - 1)]
        return EnvStep(observation=list(observation) if isinstance(observation, list) else str(observation),
                       reward=reward)
