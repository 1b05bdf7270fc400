"""The starvation watch: when every group ends unusable, the run stops with counts and the likely cause.

Dynamic sampling drops zero-variance groups; too-long prompts, bad images, failed requests and
reward errors drop others. If none becomes trainable the trainer would wait forever. The
rollouter feeds the watch every group's outcome; after `limit` unusable groups in a row (no
trainable group between them) `verdict` returns the error message. A count, not a clock: a slow
trainer step or a long generation never trips it, and all-unusable data trips it as fast as the
rollout can burn through `limit` groups. Pure, no Ray.
"""

import time
from collections import Counter
from dataclasses import dataclass, field

UNUSABLE = ("filtered", "rejected", "failed", "reward_errors")

CAUSES = {
    "filtered": "every sample of each group got the same reward ({rewards}), so dynamic sampling dropped the "
                "group. The reward function may not fit the data (data.reward_fn; the ground truth is read from "
                "`ground_truth` or `reward_model.ground_truth`), or the task is too hard or too easy for the "
                "model. To train on such groups anyway set algorithm.drop_zero_variance_groups=false.",
    "reward_errors": "the reward function raised or returned NaN/inf for every sample (see the reward errors "
                     "in the log and rollout/reward_errors).",
    "rejected": "prompts were rejected before generation: longer than data.max_prompt_length or the engine's "
                "window, or with missing images (see data/prompts_too_long, rollout/rejected_too_long, "
                "rollout/image_errors).",
    "failed": "requests failed or were aborted (see the rollout server logs and rollout/groups_failed).",
}


class StarvationError(RuntimeError):
    """No trainable group for `limit` groups in a row; the message gives the counts and the likely cause."""


@dataclass
class StarvationWatch:
    limit: int  # pipeline.max_unusable_groups_in_a_row
    in_a_row: Counter = field(default_factory=Counter)  # unusable outcomes since the last usable group
    filtered_rewards: Counter = field(default_factory=Counter)  # the common reward of each filtered group
    empty_ground_truth: int = 0
    streak_started: float | None = None

    def usable(self) -> None:
        self.in_a_row.clear()
        self.filtered_rewards.clear()
        self.empty_ground_truth = 0
        self.streak_started = None

    def unusable(self, kind: str, *, reward: float | None = None, empty_ground_truth: bool = False,
                 now: float | None = None) -> None:
        if kind not in UNUSABLE:
            raise ValueError(f"unknown outcome {kind!r}: use one of {', '.join(UNUSABLE)}")
        if self.streak_started is None:
            self.streak_started = time.monotonic() if now is None else now
        self.in_a_row[kind] += 1
        if reward is not None:
            self.filtered_rewards[round(reward, 6)] += 1
        self.empty_ground_truth += empty_ground_truth

    @property
    def streak(self) -> int:
        return sum(self.in_a_row.values())

    def verdict(self, now: float | None = None) -> str | None:
        """None while fine; else why the run must stop (counts, duration and the likely cause)."""
        if self.streak < self.limit:
            return None
        now = time.monotonic() if now is None else now
        counts = ", ".join(f"{k} {self.in_a_row[k]}" for k in UNUSABLE if self.in_a_row[k])
        top = max(UNUSABLE, key=lambda k: self.in_a_row[k])
        rewards = ", ".join(f"{r:g} x{n}" for r, n in self.filtered_rewards.most_common(3))
        message = (f"no trainable group: the last {self.streak} groups in a row were unusable ({counts}) over "
                   f"{now - (self.streak_started or now):.0f} s (pipeline.max_unusable_groups_in_a_row="
                   f"{self.limit}). Likely cause: " + CAUSES[top].format(rewards=rewards or "n/a"))
        if self.empty_ground_truth:
            message += (f" {self.empty_ground_truth} of these prompts had an empty ground truth: check the "
                        "ground-truth key of the data.")
        return message
