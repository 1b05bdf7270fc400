"""The async loop. Rollout runs continuously in the rollouter actor; this loop trains:

    take a batch of fresh groups -> train one step -> every K steps sync weights -> report

Where a sample is born: pipeline/rollouter.py. Where it is trained on: training/worker.py.
Where the weights go back: sync/coordinator.py. Dead rollout servers are replaced by
pipeline/supervisor.py; any other failure ends the run with the checkpoint to resume from.
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
from verl_async.pipeline.supervisor import ServerSupervisor
from verl_async.types import Group

logger = logging.getLogger(__name__)
BATCH_POLL_S = 5.0  # how often a waiting trainer checks the rollouter and the servers
WAIT_LOG_S = 120.0  # a trainer waiting this long for one batch says so, with the rollout's counts


class PipelineError(RuntimeError):
    """The run stopped; the message says why and which checkpoint to resume from."""


async def train_loop(job: JobConfig, r: Roles, report: Reporter, start: checkpoint.ResumeState) -> dict[str, float]:
    p, totals = job.pipeline, {"sync/count": 0.0, "queue/stale_dropped": 0.0}
    await r.coordinator.setup(policy_version=start.step)  # the handshake: a broken sync path fails before step 0
    await r.queue.restore.remote(start.queued_groups)
    await r.rollouter.start.remote()
    supervisor = ServerSupervisor(r.servers, r.coordinator, r.rollouter, r.spawn_server, job.rollout.max_restarts)
    for step in range(start.step, p.total_steps):
        t0 = time.monotonic()
        groups, wait_s = await take_batch(r, supervisor, p.batch_groups, step, p.max_staleness, totals)
        batch, stats = build_train_batch(groups, step, step, job.algorithm.advantage)
        train = await r.trainer.train_step_async(batch)
        sync_due = (step + 1) % p.sync_every_steps == 0 or step + 1 == p.total_steps
        sync = await supervisor.maintain(step + 1, sync_due)  # also replaces dead servers
        totals["sync/count"] += bool(sync)
        await r.rollouter.on_step.remote(r.coordinator.policy_version)
        rollout = await r.rollouter.pop_metrics.remote()
        elapsed = time.monotonic() - t0
        report.step(step, {**rollout, **supervisor.metrics(), **train.metrics, **sync, **totals,
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


async def take_batch(r: Roles, supervisor: ServerSupervisor, num_groups: int, trainer_version: int,
                     max_staleness: int, totals: dict[str, float]) -> tuple[list[Group], float]:
    """Wait for `num_groups` groups within the staleness bound. While waiting: replace dead servers,
    and fail loudly if the rollouter stopped (it died, or no group was trainable)."""
    groups, waited, logged = [], 0.0, 0.0
    while len(groups) < num_groups:
        got = await r.queue.get_batch.remote(num_groups - len(groups), trainer_version, max_staleness, BATCH_POLL_S)
        groups += got.groups
        waited += got.wait_s
        totals["queue/stale_dropped"] += got.stale_dropped
        if got.stale_dropped:  # their slots are free now: the rollouter must not wait for the next step
            await r.rollouter.on_stale_dropped.remote(int(totals["queue/stale_dropped"]))
        if len(groups) >= num_groups:
            break
        if (err := await r.rollouter.health.remote()) is not None:
            raise PipelineError(f"the rollout stopped: {err}")
        await supervisor.maintain(trainer_version, sync_due=False)
        if waited - logged >= WAIT_LOG_S:
            logged = waited
            logger.warning("step %d has waited %.0f s for groups (%d of %d so far); rollout: %s", trainer_version,
                           waited, len(groups), num_groups, await r.rollouter.progress.remote())
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
                    stale_dropped=queue["stale_dropped"], failed=counts.failed, requeued=counts.requeued,
                    in_flight=counts.in_flight, queued=queue["queued"])
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
        try:
            final = asyncio.run(train_loop(job, roles, report, start))
        except Exception as e:  # the run's boundary: re-raised with what to do next
            raise PipelineError(failure_message(e, job.output_dir, job.trainer.checkpoint_every_steps)) from e
        report.final(final)
        plots = report.plot() if job.logging.plots else []
        logger.info("metrics: %s/metrics.jsonl; plots: %s", job.output_dir, ", ".join(plots) or "off")
        return final
    finally:
        report.close()
        roles.shutdown()


def failure_message(error: BaseException, output_dir: str, checkpoint_every_steps: int) -> str:
    """Why the run stopped, and where it can resume from."""
    latest = checkpoint.latest_checkpoint(output_dir)
    where = (f"resume from {latest} (step {int((latest / 'COMPLETE').read_text())}) with resume=true"
             if latest is not None else "no checkpoint was written yet: a rerun starts from step 0")
    cadence = (f"checkpoints are written every {checkpoint_every_steps} steps" if checkpoint_every_steps
               else "set trainer.checkpoint_every_steps to checkpoint during the run")
    return f"run failed: {_describe(error)}. Fix the cause, then {where} ({cadence})."


def _describe(error: BaseException) -> str:
    """A remote error's own type and message, without Ray's traceback around it."""
    import ray

    if isinstance(error, PipelineError):
        return str(error)
    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        error = error.cause
    return f"{type(error).__name__}: {error}"
