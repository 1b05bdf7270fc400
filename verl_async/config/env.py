"""Multi-turn rollouts: the environment a model talks to, and the budgets of one episode."""

from dataclasses import dataclass, field
from typing import Any

from verl_async.config._check import absolute_spec, check


@dataclass
class EnvConfig:
    name: str = ""
    """Environment for multi-turn, tool-using rollouts: a registry name (verl_async/envs), an import
    path `package.module:Class` or a file `path/to/file.py:Class`. Empty: single-turn rollouts."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the environment's constructor (checked against its signature at start-up)."""
    max_turns: int = 4
    """Model turns per episode at most; an episode the environment has not ended by then is truncated."""
    max_episode_tokens: int = 256
    """Response tokens per episode, model and environment tokens together (the prompt not counted);
    an episode that runs out is truncated. The engine's max_model_len bounds it too."""
    max_tokens_per_turn: int = 0
    """Tokens one model turn may generate at most; 0: rollout.response_length."""
    observation_role: str = "tool"
    """Chat role of text observations; they are rendered with the model's chat template."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a model turn besides EOS (e.g. a tool-call end token); they stay in the turn."""

    def __post_init__(self) -> None:
        self.name = absolute_spec(self.name)
        check(self.max_turns >= 1, "data.env.max_turns", self.max_turns, "use at least 1 turn.")
        check(self.max_episode_tokens >= 1, "data.env.max_episode_tokens", self.max_episode_tokens,
              "use at least 1 token.")
        check(self.max_tokens_per_turn >= 0, "data.env.max_tokens_per_turn", self.max_tokens_per_turn,
              "use 0 (rollout.response_length) or more tokens.")
        check(bool(self.observation_role), "data.env.observation_role", self.observation_role,
              "name a chat role, e.g. tool or user.")
        check(all(t >= 0 for t in self.stop_token_ids), "data.env.stop_token_ids", self.stop_token_ids,
              "use token ids (>= 0).")

    @property
    def enabled(self) -> bool:
        """True when rollouts are multi-turn episodes with this environment."""
        return bool(self.name)
