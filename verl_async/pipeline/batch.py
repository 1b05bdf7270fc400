"""Groups -> TrainBatch: advantages, loss masks and the staleness check at consumption. Pure."""

from dataclasses import dataclass

from verl_async.algorithms.advantages import compute_advantages
from verl_async.pipeline.staleness import version_lag, within_bound
from verl_async.types import FinishReason, Group, TrainBatch, TrainRow


@dataclass
class BatchStats:
    """What forming one batch observed, for `staleness/` metrics."""

    max_lag: int
    mean_lag: float
    truncated_frac: float
    reward_mean: float  # over the trained samples (defined every step, unlike the rollout window's)


def split_by_staleness(groups: list[Group], trainer_version: int, max_staleness: int) -> tuple[list[Group], list[Group]]:
    """(fresh enough, too stale): the hard bound on the oldest token of each group."""
    keep, drop = [], []
    for g in groups:
        (keep if within_bound(trainer_version, g.min_policy_version, max_staleness) else drop).append(g)
    return keep, drop


def build_train_batch(groups: list[Group], step: int, trainer_version: int, advantage: str,
                      mask_truncated: bool = False) -> tuple[TrainBatch, BatchStats]:
    """One row per sample with its group-normalised advantage. A truncated sample (finish
    reason `length`) is trained with its reward, or fully masked when `mask_truncated`.
    Environment tokens of a multi-turn episode keep loss mask 0; lags count model tokens only."""
    advantages = compute_advantages([g.rewards for g in groups], method=advantage)
    rows, lags, truncated = [], [], 0
    for group, group_adv in zip(groups, advantages, strict=True):
        for sample, adv in zip(group.samples, group_adv, strict=True):
            gen = sample.generation
            if gen.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH):
                raise ValueError(f"request {gen.request_id} ended with {gen.finish_reason}: it must not reach training")
            is_truncated = gen.finish_reason == FinishReason.LENGTH
            truncated += is_truncated
            keep = 0 if (is_truncated and mask_truncated) else 1
            mask = gen.loss_mask if gen.loss_mask is not None else [1] * len(gen.response_ids)
            rows.append(TrainRow(
                prompt_ids=gen.prompt_ids, response_ids=gen.response_ids, rollout_logprobs=gen.logprobs,
                loss_mask=[keep * m for m in mask], advantage=adv, policy_versions=gen.policy_versions,
                multi_modal_inputs=sample.multi_modal_data,
            ))
            lags += [version_lag(trainer_version, v) for v in gen.model_policy_versions]
    stats = BatchStats(max_lag=max(lags, default=0), mean_lag=sum(lags) / max(len(lags), 1),
                       truncated_frac=truncated / max(len(rows), 1),
                       reward_mean=sum(r for g in groups for r in g.rewards) / max(len(rows), 1))
    return TrainBatch(rows=rows, step=step, policy_version=trainer_version), stats
