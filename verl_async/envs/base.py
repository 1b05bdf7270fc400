"""The environment protocol: what a multi-turn rollout talks to between model turns.

One instance per episode. `start(row)` begins the episode; each finished model turn goes to
`step(turn)`, which answers with an observation (a tool result, a user reply), a reward
contribution and whether the episode is over. An environment never sees or builds the token
history: the workflow (rollout/multi_turn.py) appends its observation after the model's tokens.
"""

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from verl_async.types import FinishReason, PromptRow


@dataclass
class ModelTurn:
    """One model turn, exactly as the engine produced it."""

    index: int  # 0 for the first turn of the episode
    token_ids: list[int]  # the turn's tokens (EOS or a stop token included when the turn ended on one)
    text: str  # token_ids decoded, special tokens skipped
    finish_reason: FinishReason  # STOP: the model ended its turn; LENGTH: the per-turn cap cut it


@dataclass
class EnvStep:
    """The environment's answer to one model turn. Invariant: `reward` is finite."""

    observation: str | list[int] = ""
    """Text: rendered as a chat message of role data.env.observation_role with the model's chat
    template (the EOS that closes the model's turn is added when the turn did not end on it).
    Token ids: appended exactly as given (the environment owns the format). Ignored when done."""
    reward: float = 0.0
    """This step's reward contribution; the episode's reward is the sum (plus data.reward_fn on the
    final turn when the environment ended the episode)."""
    done: bool = False
    """True: the episode is complete after this model turn (the turn was the final answer)."""


@runtime_checkable
class Environment(Protocol):
    """A multi-turn environment. Both methods are coroutines; raise to fail the episode (counted)."""

    async def start(self, row: PromptRow) -> None:
        """Begin an episode for `row` (its prompt is what the model sees first)."""

    async def step(self, turn: ModelTurn) -> EnvStep:
        """Answer the model's turn."""
