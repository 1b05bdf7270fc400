"""The async loop. Rollout runs continuously in the rollouter actor; this loop trains:

    take a batch of fresh groups -> train one step -> every K steps sync weights -> report

Where a sample is born: pipeline/rollouter.py. Where it is trained on: training/worker.py.
Where the weights go back: sync/coordinator.py.
"""

import asyncio
import dataclasses
import logging
import time

from verl_async.config import JobConfig
from verl_async.pipeline import checkpoint
from verl_async.pipeline.batch import build_train_batch
from verl_async.pipeline.launch import Roles, init_ray, launch, start_rollouter
from verl_async.pipeline.ledger import Ledger
from verl_async.pipeline.report import Reporter
from verl_async.types import Group

logger = logging.getLogger(__name__)
BATCH_POLL_S = 30.0  # how often a waiting trainer checks that the rollouter is alive


async def train_loop(job: JobConfig, r: Roles, report: Reporter, start: checkpoint.ResumeState) -> dict[str, float]:
    p, totals = job.pipeline, {"sync/count": 0.0, "queue/stale_dropped": 0.0}
    await r.coordinator.setup(policy_version=start.step)  # the handshake: a broken sync path fails before step 0
    await r.queue.restore.remote(start.queued_groups)
    await r.rollouter.start.remote()
    engine_version = start.step
    for step in range(start.step, p.total_steps):
        t0 = time.monotonic()
        groups, wait_s = await take_batch(r, p.batch_groups, step, p.max_staleness, totals)
        batch, stats = build_train_batch(groups, step, step, job.algorithm.advantage)
        train = await r.trainer.train_step_async(batch)
        sync = {}
        if (step + 1) % p.sync_every_steps == 0 or step + 1 == p.total_steps:
            sync = await r.coordinator.sync(policy_version=step + 1)
            engine_version, totals["sync/count"] = step + 1, totals["sync/count"] + 1
        await r.rollouter.on_step.remote(engine_version)
        rollout = await r.rollouter.pop_metrics.remote()
        elapsed = time.monotonic() - t0
        report.step(step, {**rollout, **train.metrics, **sync, **totals,
                           "staleness/max": stats.max_lag, "staleness/mean": stats.mean_lag,
                           "rollout/truncated_frac": stats.truncated_frac, "train/reward_mean": stats.reward_mean,
                           "queue/depth": await r.queue.depth.remote(),
                           "perf/step_s": elapsed, "perf/tokens_per_s": rollout["rollout/tokens"] / elapsed,
                           "perf/trainer_tokens_per_s": trainer_tokens_per_s(train.metrics),
                           "perf/trainer_idle_ratio": min(1.0, wait_s / elapsed)})
        if job.trainer.checkpoint_every_steps and (step + 1) % job.trainer.checkpoint_every_steps == 0:
            await save_checkpoint(job, r, step + 1)
    return await finish(job, r, report)


def trainer_tokens_per_s(train: dict[str, float]) -> float:
    """Tokens (prompt + response) the trainer processed per second of its step."""
    return train["train/tokens"] / max(train["train/step_s"], 1e-9)


async def take_batch(r: Roles, num_groups: int, trainer_version: int, max_staleness: int,
                     totals: dict[str, float]) -> tuple[list[Group], float]:
    """Wait for `num_groups` groups within the staleness bound; fail loudly if the rollouter died."""
    groups, waited = [], 0.0
    while len(groups) < num_groups:
        got = await r.queue.get_batch.remote(num_groups - len(groups), trainer_version, max_staleness, BATCH_POLL_S)
        groups += got.groups
        waited += got.wait_s
        totals["queue/stale_dropped"] += got.stale_dropped
        if got.stale_dropped:  # their slots are free now: the rollouter must not wait for the next step
            await r.rollouter.on_stale_dropped.remote(int(totals["queue/stale_dropped"]))
        if len(groups) < num_groups and (err := await r.rollouter.health.remote()) is not None:
            raise RuntimeError(f"the rollouter stopped: {err}")
    return groups, waited


async def save_checkpoint(job: JobConfig, r: Roles, step: int) -> None:
    state = await r.rollouter.checkpoint_state.remote()
    resume = checkpoint.ResumeState(step=step, position=state["position"], pending_rows=state["pending_rows"],
                                    queued_groups=state["queued_groups"])
    await asyncio.to_thread(checkpoint.save, r.trainer, job.output_dir, resume)


async def finish(job: JobConfig, r: Roles, report: Reporter) -> dict[str, float]:
    """Stop the rollout, save, and account for every prompt read."""
    counts = await r.rollouter.stop.remote()
    if job.trainer.save_at_end:
        await save_checkpoint(job, r, job.pipeline.total_steps)
        await asyncio.to_thread(r.trainer.export_hf, f"{job.output_dir}/hf")
    queue = await r.queue.counts.remote()
    ledger = Ledger(read=counts.read, trained=queue["taken"], filtered=counts.filtered, rejected=counts.rejected,
                    stale_dropped=queue["stale_dropped"], failed=counts.failed, in_flight=counts.in_flight,
                    queued=queue["queued"])
    final = {**report.history[-1], **ledger.metrics()} if report.history else ledger.metrics()
    final.pop("step", None)
    if ledger.balance() != 0:
        logger.error("ledger does not balance: %s", ledger)
    return final


def run_pipeline(job: JobConfig, device: str) -> dict[str, float]:
    from verl_async.assets.build import resolve_model_path
    from verl_async.envs import check_env_at_startup

    model_path = resolve_model_path(job.model.path, job.model.assets_dir)
    check_env_at_startup(job.data.env, model_path)  # a wrong environment fails before any engine starts
    init_ray(job, device)
    roles = launch(job, device, model_path)
    start = (checkpoint.restore(roles.trainer, job.output_dir) if job.resume else None) or checkpoint.ResumeState()
    start_rollouter(job, roles, model_path, start)
    report = Reporter(job.logging, job.output_dir, job.pipeline.total_steps, dataclasses.asdict(job), start.step)
    try:
        final = asyncio.run(train_loop(job, roles, report, start))
        report.final(final)
        plots = report.plot() if job.logging.plots else []
        logger.info("metrics: %s/metrics.jsonl; plots: %s", job.output_dir, ", ".join(plots) or "off")
        return final
    finally:
        report.close()
        roles.shutdown()
