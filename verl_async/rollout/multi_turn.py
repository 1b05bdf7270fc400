"""Multi-turn rollouts: an episode is model turns and environment observations in one token sequence.

    generate a turn -> the environment answers -> append its observation tokens -> next turn

until the environment ends the episode (complete: finish reason STOP), or max_turns, the episode's
token budget or the engine's context window ends it (truncated: finish reason LENGTH; it never
gets the final-answer reward). Token-in / token-out: every turn sends the exact ids of the turns
and observations before it, and the trainer gets exactly those ids. Observation tokens have loss
mask 0; model tokens keep the policy_version the server gave each of them, so a weight sync
between turns or inside one (keep-mode pause) shows at the exact token.
"""

import asyncio
import logging
import math
from dataclasses import dataclass, field
from enum import StrEnum

from verl_async.config import EnvConfig
from verl_async.envs import EnvFactory, EnvStep, ModelTurn
from verl_async.rollout.turn_format import TurnFormat
from verl_async.types import EnginePrompt, FinishReason, Generation, PromptRow

logger = logging.getLogger(__name__)


class EpisodeEnd(StrEnum):
    """Why an episode ended. DONE is the only complete end."""

    DONE = "done"  # the environment ended it
    MAX_TURNS = "max_turns"  # truncated: data.env.max_turns model turns
    BUDGET = "budget"  # truncated: data.env.max_episode_tokens spent
    WINDOW = "window"  # truncated: no room left in the engine's max_model_len
    ABORTED = "aborted"  # a model turn was aborted or failed in the engine (never trained on)
    ENV_ERROR = "env_error"  # the environment raised (never trained on)


TRUNCATED = (EpisodeEnd.MAX_TURNS, EpisodeEnd.BUDGET, EpisodeEnd.WINDOW)


@dataclass
class Episode:
    """One finished episode. Invariant: generation.loss_mask is 1 exactly on the model's tokens,
    and turn_spans are the (start, end) offsets of the model turns in generation.response_ids."""

    generation: Generation
    end: EpisodeEnd
    env_reward: float  # the sum of the environment's step rewards
    answer: str | None  # the last model turn's text when the environment ended the episode, else None
    turn_spans: list[tuple[int, int]]

    @property
    def num_turns(self) -> int:
        return len(self.turn_spans)


@dataclass
class _Trace:
    """The growing token sequence of one episode."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    preemptions: int = 0
    cached: int = 0
    server_index: int = 0

    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def add_model(self, gen: Generation) -> None:
        start = len(self.response_ids)
        self.response_ids += gen.response_ids
        self.logprobs += gen.logprobs
        self.versions += gen.policy_versions
        self.mask += [1] * len(gen.response_ids)
        self.turn_spans.append((start, len(self.response_ids)))
        self.preemptions += gen.num_preemptions
        self.cached += gen.num_cached_prompt_tokens
        self.server_index = gen.server_index

    def add_env(self, ids: list[int]) -> None:
        """Environment tokens: loss mask 0, a placeholder logprob (never used), and the version of the
        model token before them (so policy_versions stays non-decreasing; staleness ignores them)."""
        self.response_ids += ids
        self.logprobs += [0.0] * len(ids)
        self.versions += [self.versions[-1] if self.versions else 0] * len(ids)
        self.mask += [0] * len(ids)

    def generation(self, request_id: str, reason: FinishReason) -> Generation:
        return Generation(request_id=request_id, prompt_ids=self.prompt_ids, response_ids=self.response_ids,
                          logprobs=self.logprobs, policy_versions=self.versions, finish_reason=reason,
                          num_preemptions=self.preemptions, num_cached_prompt_tokens=self.cached,
                          server_index=self.server_index, loss_mask=self.mask)


class EnvError(RuntimeError):
    """The environment raised or answered with something unusable (one failed episode)."""


class MultiTurnWorkflow:
    """Runs episodes through a RolloutManager (plain class in the rollouter's process).

    manager: anything with `generate(...)` and `max_model_len` like rollout/manager.RolloutManager.
    response_length: the per-turn cap when data.env.max_tokens_per_turn is 0.
    """

    def __init__(self, env: EnvConfig, make_env: EnvFactory, manager, tokenizer, response_length: int):
        self.env = env
        self.make_env = make_env
        self.manager = manager
        self.tokenizer = tokenizer
        self.turn_cap = env.max_tokens_per_turn or response_length
        self.format = TurnFormat.from_tokenizer(tokenizer, env.observation_role)
        self.sampling = {"stop_token_ids": list(env.stop_token_ids)} if env.stop_token_ids else None
        self.counters = {f"rollout/episodes_{end.value}": 0.0 for end in EpisodeEnd}
        self.counters["rollout/env_errors"] = 0.0
        self._turns: list[int] = []
        self._env_tokens = 0

    async def run_group(self, row: PromptRow, group_id: str, prompt: EnginePrompt, n: int) -> list[Episode]:
        """`n` episodes of one prompt on one server (prefix caching). A prompt too long for the
        window raises PromptTooLongError, as a single-turn request would."""
        results = await asyncio.gather(*[self.run_episode(row, f"{group_id}/{i}", prompt, group_id)
                                         for i in range(n)], return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    async def run_episode(self, row: PromptRow, request_id: str, prompt: EnginePrompt,
                          affinity_key: str | None = None) -> Episode:
        trace = _Trace(prompt_ids=list(prompt.prompt_ids))
        env_reward, answer, end, reason = 0.0, None, EpisodeEnd.MAX_TURNS, FinishReason.LENGTH
        try:
            env = _make_env(self.make_env)
            await _call_env(env.start(row), "start")
            for index in range(self.env.max_turns):
                gen = await self._generate(row, f"{request_id}/t{index}", trace, affinity_key)
                trace.add_model(gen)
                if gen.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH):
                    end, reason = EpisodeEnd.ABORTED, gen.finish_reason
                    break
                if gen.finish_reason == FinishReason.LENGTH and (cut := self._out_of_room(trace, 0)) is not None:
                    end = cut  # cut by the episode budget or the window, not by the per-turn cap
                    break
                turn = ModelTurn(index, gen.response_ids, self._decode(gen.response_ids), gen.finish_reason)
                step = await _call_env(env.step(turn), "step")
                env_reward += _finite_reward(step)
                if step.done:
                    end, reason, answer = EpisodeEnd.DONE, FinishReason.STOP, turn.text
                    break
                obs = self._observation_ids(step, gen.response_ids)
                if (cut := self._out_of_room(trace, len(obs))) is not None:
                    end = cut
                    break
                trace.add_env(obs)
        except EnvError:
            self.counters["rollout/env_errors"] += 1
            logger.exception("environment failed in episode %s (prompt %s): the episode is not trained on",
                             request_id, row.prompt_id)
            end, reason = EpisodeEnd.ENV_ERROR, FinishReason.ERROR
        self.counters[f"rollout/episodes_{end.value}"] += 1
        self._turns.append(len(trace.turn_spans))
        self._env_tokens += len(trace.mask) - sum(trace.mask)
        return Episode(trace.generation(request_id, reason), end, env_reward, answer, trace.turn_spans)

    async def _generate(self, row: PromptRow, request_id: str, trace: _Trace, affinity_key: str | None) -> Generation:
        """One model turn: max_tokens = min(remaining episode budget, per-turn cap), clamped by the
        manager to the engine's window (the rule of rollout/sampling.clamp_max_tokens)."""
        remaining = self.env.max_episode_tokens - len(trace.response_ids)
        return await self.manager.generate(row.prompt_id, request_id, EnginePrompt(trace.ids()),
                                           max_tokens=min(remaining, self.turn_cap), sampling=self.sampling,
                                           affinity_key=affinity_key)

    def _out_of_room(self, trace: _Trace, extra: int) -> EpisodeEnd | None:
        """BUDGET / WINDOW when `extra` more tokens would leave no room for one more model token."""
        if len(trace.response_ids) + extra >= self.env.max_episode_tokens:
            return EpisodeEnd.BUDGET
        if len(trace.prompt_ids) + len(trace.response_ids) + extra >= self.manager.max_model_len:
            return EpisodeEnd.WINDOW
        return None

    def _observation_ids(self, step: EnvStep, turn_ids: list[int]) -> list[int]:
        obs = step.observation
        if isinstance(obs, str):
            ended_with_eos = bool(turn_ids) and turn_ids[-1] == self.format.eos_token_id
            return self.format.observation_ids(obs, ended_with_eos)
        if not isinstance(obs, list) or not all(isinstance(t, int) and t >= 0 for t in obs):
            raise EnvError(f"EnvStep.observation must be text or a list of token ids (ints >= 0), got {obs!r:.80}")
        return list(obs)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def pop_metrics(self) -> dict[str, float]:
        """Counters (monotone) and this window's means: turns per episode, environment tokens."""
        out = dict(self.counters)
        out["rollout/turns_mean"] = sum(self._turns) / len(self._turns) if self._turns else float("nan")
        out["rollout/env_tokens"] = float(self._env_tokens)
        self._turns, self._env_tokens = [], 0
        return out


def _make_env(make_env: EnvFactory):
    try:
        return make_env()
    except Exception as e:  # the environment is user code: its failure fails one episode, counted
        raise EnvError(f"the environment's constructor raised {type(e).__name__}: {e}") from e


async def _call_env(call, what: str):
    """Await an environment call; whatever it raises becomes an EnvError (one failed episode)."""
    try:
        return await call
    except Exception as e:  # the environment is user code: its failure fails one episode, counted
        raise EnvError(f"environment {what}() raised {type(e).__name__}: {e}") from e


def _finite_reward(step: EnvStep) -> float:
    if not isinstance(step, EnvStep):
        raise EnvError(f"environment step() must return an EnvStep, got {type(step).__name__}")
    try:
        reward = float(step.reward)
    except (TypeError, ValueError):
        raise EnvError(f"environment step() returned a reward that is not a number: {step.reward!r}") from None
    if not math.isfinite(reward):
        raise EnvError(f"environment step() returned a non-finite reward {step.reward!r}")
    return reward
