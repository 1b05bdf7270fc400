"""The asynchronous controller: mode, batch size, staleness and sync cadence."""

from dataclasses import dataclass

from verl_async.config._check import check, check_choice

MODES = ("sync_baseline", "streaming", "async", "partial_rollout")


@dataclass
class PipelineConfig:
    mode: str = "partial_rollout"
    """sync_baseline: generate a batch, train, sync (on-policy; no overlap).
    streaming: one policy version generates sync_every_steps batches that stream into the trainer
    as groups finish; lag <= sync_every_steps - 1; syncs wait for in-flight requests.
    async: rollout runs up to max_staleness versions ahead; syncs wait for in-flight requests.
    partial_rollout: like async, but syncs pause in-flight requests (keep mode) and they continue
    under the new weights (each token records its policy_version)."""
    total_steps: int = 20
    """Optimizer steps to run."""
    batch_groups: int = 8
    """Prompt groups per training step (batch = batch_groups * rollout.n samples)."""
    max_staleness: int = 1
    """Hard bound on policy_version lag of every trained token (0 = on-policy)."""
    sync_every_steps: int = 1
    """Push weights to the rollout servers every K optimizer steps."""
    max_inflight_groups: int = 0
    """Groups being generated at once; 0 = batch_groups * (max_staleness + 1)."""
    max_unusable_groups_in_a_row: int = 256
    """Stop the run, with the counts and the likely cause, when this many groups in a row ended unusable
    (zero-variance filtered, rejected, failed, or every sample a reward error) instead of the trainer
    waiting forever. The default is far beyond a run of bad luck at even 90% filtering (0.9^256 ~ 2e-12)."""

    def __post_init__(self) -> None:
        check_choice("pipeline.mode", self.mode, MODES)
        check(self.total_steps >= 1, "pipeline.total_steps", self.total_steps, "use at least 1.")
        check(self.batch_groups >= 1, "pipeline.batch_groups", self.batch_groups, "use at least 1.")
        check(self.max_staleness >= 0, "pipeline.max_staleness", self.max_staleness, "use 0 (on-policy) or more.")
        check(self.sync_every_steps >= 1, "pipeline.sync_every_steps", self.sync_every_steps, "use at least 1.")
        check(self.max_inflight_groups >= 0, "pipeline.max_inflight_groups", self.max_inflight_groups, "use 0 (auto) or more.")
        check(self.max_unusable_groups_in_a_row >= 1, "pipeline.max_unusable_groups_in_a_row",
              self.max_unusable_groups_in_a_row, "use at least 1 (the default 256 is safe for hard data).")
        if self.mode == "sync_baseline":
            check(self.max_staleness == 0, "pipeline.max_staleness", self.max_staleness,
                  "the sync_baseline mode is on-policy: set pipeline.max_staleness=0.")
            check(self.sync_every_steps == 1, "pipeline.sync_every_steps", self.sync_every_steps,
                  "the sync_baseline mode syncs after every step: set pipeline.sync_every_steps=1.")
        if self.mode == "streaming":
            check(self.max_staleness == self.sync_every_steps - 1, "pipeline.max_staleness", self.max_staleness,
                  f"streaming trains each sync window's samples within it: set it to sync_every_steps - 1 "
                  f"= {self.sync_every_steps - 1}.")

    @property
    def pause_mode(self) -> str:
        """How a weight sync treats in-flight requests: keep them (partial rollout) or let them finish."""
        return "keep" if self.mode in ("partial_rollout", "sync_baseline") else "wait"
