"""The data that crosses component boundaries. Plain dataclasses with lists, no tensors.

Where a sample is born: rollout.server returns a `Generation`; the pipeline wraps it
with its prompt and reward into a `Sample`; groups of samples become the trainer's
`TrainBatch` rows. Each class states its invariant.
"""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class FinishReason(StrEnum):
    """Why generation of a sample ended. Only STOP samples count as complete answers."""

    STOP = "stop"  # the model emitted EOS / a stop token
    LENGTH = "length"  # the token budget ran out (truncated)
    ABORT = "abort"  # aborted by us or the engine (never trained on as if complete)
    ERROR = "error"  # the engine failed this request


@dataclass
class PromptRow:
    """One dataset row in the common RL layout. Invariant: `messages` is non-empty."""

    prompt_id: str
    messages: list[dict[str, Any]]  # chat messages; content is a str or a list of {type: text|image} parts
    ground_truth: str = ""
    images: list[Any] = field(default_factory=list)  # file paths, bytes or PIL images
    extra_info: dict[str, Any] = field(default_factory=dict)
    data_source: str = ""


@dataclass
class EnginePrompt:
    """What is sent to an engine. Invariant: len(prompt_ids) is the real prompt length,
    vision tokens included (so clamping and the too-long check use the true count)."""

    prompt_ids: list[int]
    multi_modal_data: dict[str, Any] | None = None  # e.g. {"image": [PIL.Image, ...]}


@dataclass
class Generation:
    """One finished engine request, or one multi-turn episode (rollout/multi_turn.py). Invariant:
    len(response_ids) == len(logprobs) == len(policy_versions) (== len(loss_mask) when set);
    policy_versions is non-decreasing."""

    request_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # logprob of each sampled token under the sampling distribution
    policy_versions: list[int]  # the weights' version that produced each response token
    finish_reason: FinishReason
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0
    server_index: int = 0
    loss_mask: list[int] | None = None  # multi-turn: 0 on tokens the environment inserted; None: all 1

    @property
    def model_policy_versions(self) -> list[int]:
        """The policy_version of each token the model produced (environment tokens left out)."""
        if self.loss_mask is None:
            return self.policy_versions
        return [v for v, m in zip(self.policy_versions, self.loss_mask, strict=True) if m]

    @property
    def num_model_tokens(self) -> int:
        return len(self.response_ids) if self.loss_mask is None else sum(self.loss_mask)


@dataclass
class Sample:
    """A scored generation. Invariant: reward is set once, by the rollouter."""

    prompt_id: str
    group_id: str
    generation: Generation
    reward: float = 0.0
    multi_modal_data: dict[str, Any] | None = None

    @property
    def is_complete(self) -> bool:
        return self.generation.finish_reason == FinishReason.STOP

    @property
    def num_tokens(self) -> int:
        return len(self.generation.prompt_ids) + len(self.generation.response_ids)


@dataclass
class Group:
    """All samples of one prompt. Invariant: every sample has the same prompt_id."""

    prompt_id: str
    samples: list[Sample]

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]

    @property
    def min_policy_version(self) -> int:
        """The oldest weights any model token of this group came from."""
        return min((min(s.generation.model_policy_versions, default=0) for s in self.samples), default=0)


@dataclass
class TrainRow:
    """One sequence for the trainer. Invariant: len(response_ids) == len(rollout_logprobs)
    == len(loss_mask); advantage is one scalar per sequence (GRPO)."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    loss_mask: list[int]  # 1 = trained on, 0 = ignored (environment tokens of a multi-turn episode, masked truncations)
    advantage: float
    policy_versions: list[int]
    multi_modal_inputs: dict[str, Any] | None = None  # processor outputs, e.g. pixel_values, image_grid_thw


@dataclass
class TrainBatch:
    """What one optimizer step consumes. Invariant: rows is non-empty."""

    rows: list[TrainRow]
    step: int  # the optimizer step this batch is for
    policy_version: int  # the trainer's weights' version when the batch was formed


@dataclass
class TrainMetrics:
    """What a train step reports back; names already carry the `train/` prefix."""

    step: int
    metrics: dict[str, float]


@dataclass
class TensorMeta:
    """Name, dtype and shape of one weight tensor sent to the engines (HF naming)."""

    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    shape: list[int]
