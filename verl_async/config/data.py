"""Where prompts come from and how they are scored."""

from dataclasses import dataclass, field

from verl_async.config._check import absolute_spec, check, check_choice
from verl_async.config.env import EnvConfig

REWARD_ERROR_POLICIES = ("drop", "zero")


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Parquet or JSONL files of rows (prompt messages, ground_truth, images, extra_info). Empty: use `generated_task`."""
    generated_task: str = "digits"
    """Built-in task generated in memory when `train_files` is empty (see verl_async/data/tasks.py)."""
    num_generated_prompts: int = 2048
    """How many prompts the generated task makes."""
    reward_fn: str = "digits"
    """Reward: a registry name (verl_async/rewards), an import path `package.module:function` or a file
    `path/to/file.py:function`. With `env`, it scores the last model turn of an episode the environment
    ended (added to the environment's rewards); `none` leaves the scoring to the environment."""
    max_prompt_length: int = 512
    """Prompts longer than this (in tokens, vision tokens included) are rejected and counted (data/prompts_too_long)."""
    reward_error: str = "drop"
    """A sample whose reward function raised or returned NaN/inf (counted as rollout/reward_errors):
    drop (the sample leaves its group) or zero (it is scored 0)."""
    max_images_per_prompt: int = 1
    """Upper bound on images in one prompt; also passed to vLLM's limit_mm_per_prompt."""
    shuffle: bool = True
    """Shuffle the rows each epoch (seeded)."""
    seed: int = 0
    """Seed for shuffling and for the generated task."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """Multi-turn rollouts: the environment and episode budgets (verl_async/config/env.py). Off by default."""

    def __post_init__(self) -> None:
        self.reward_fn = absolute_spec(self.reward_fn)
        check(self.num_generated_prompts > 0, "data.num_generated_prompts", self.num_generated_prompts, "use a positive count.")
        check(self.max_prompt_length > 0, "data.max_prompt_length", self.max_prompt_length, "use a positive token count.")
        check(self.max_images_per_prompt >= 0, "data.max_images_per_prompt", self.max_images_per_prompt, "use 0 or more.")
        check(bool(self.reward_fn), "data.reward_fn", self.reward_fn, "name a registered reward or `module:function`.")
        check_choice("data.reward_error", self.reward_error, REWARD_ERROR_POLICIES)
