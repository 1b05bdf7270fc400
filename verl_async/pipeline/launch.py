"""Start Ray (or join the cluster this job runs in) and place every role on its resources.

Rollout servers and trainer workers get separate placement groups sized from the cluster
config (GPUs on cuda; CPU cores on a CPU machine, one vLLM engine bound per core), or, on a
shared GPU (cluster.shared_gpu), one group whose bundle holds the GPU for both (resources.py).
A cluster too small for the job fails before anything starts.
"""

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from verl_async.config import JobConfig, SyncConfig
from verl_async.pipeline.resources import Placement, check_cluster, plan_placement

logger = logging.getLogger(__name__)
SHUTDOWN_S = 30.0  # engines get this long to release their memory before their actors are killed


@dataclass
class Roles:
    """Handles to everything the loop talks to."""

    servers: list[Any]
    server_infos: list[Any]
    trainer: Any  # TrainerGroup
    queue: Any  # SampleQueue actor
    coordinator: Any  # WeightSyncCoordinator
    placement_groups: list[Any]
    spawn_server: Callable[[int], Any]  # a fresh RolloutServer actor for slot i, in that slot's bundle (not started)
    rollouter: Any = None  # Rollouter actor, started by start_rollouter once the resume state is known

    def shutdown(self) -> None:
        import ray

        stop_servers(self.servers)
        for handle in [self.rollouter, self.queue, *self.servers]:
            if handle is not None:
                ray.kill(handle, no_restart=True)
        self.trainer.shutdown()
        for pg in self.placement_groups:
            ray.util.remove_placement_group(pg)


def init_ray(job: JobConfig, device: str) -> None:
    """auto: join the cluster named by RAY_ADDRESS (set inside `ray job submit`), else start one."""
    import ray

    if ray.is_initialized():
        return
    address = job.cluster.address
    if address == "auto" and not os.environ.get("RAY_ADDRESS"):
        address = "local"
    if address == "local":
        needed = (job.rollout.num_servers * job.cluster.cpus_per_rollout_server
                  + job.trainer.num_workers * job.cluster.cpus_per_trainer_worker)
        start_local_ray(num_cpus=max(needed, os.cpu_count() or 1))
    else:
        ray.init(address=address)  # joining: resources come from the cluster
    logger.info("ray: %s", ray.cluster_resources())


def start_local_ray(num_cpus: int) -> None:
    """A private local Ray runtime. Ray waits a fixed 30 s for its raylet, which a loaded
    machine can miss: that one error is retried twice, anything else propagates."""
    import ray

    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
            return
        except Exception as e:  # Ray raises a bare Exception for this case
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            logger.warning("ray start timed out (machine busy?); retrying (%d/2)", attempt + 1)
            ray.shutdown()


def _placement_group(bundles: list[dict[str, float]], name: str):
    import ray
    from ray.util.placement_group import placement_group

    pg = placement_group(bundles, strategy="PACK", name=name)
    if not pg.wait(timeout_seconds=300):
        raise RuntimeError(f"could not reserve {bundles} for {name} on the cluster ({ray.cluster_resources()}): "
                           "lower rollout.num_servers / trainer.num_workers or add nodes.")
    return pg


def job_sync(job: JobConfig, device: str) -> SyncConfig:
    """job.sync with its backend resolved (auto -> ipc on a shared GPU), for engines, trainer and coordinator."""
    from verl_async.sync.engine_side import resolved_sync

    return resolved_sync(job.sync, device, shared_gpu=job.cluster.shared_gpu)


def make_server(job: JobConfig, device: str, model_path: str, sync: SyncConfig, placement: Placement, pg: Any,
                index: int) -> Any:
    """RolloutServer actor `index` in bundle `index` of the rollout placement group (call start() on it)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from verl_async.rollout.server import RolloutServer
    from verl_async.sync.engine_side import engine_env

    r, c = job.rollout, job.cluster
    env = {"VLLM_CPU_OMP_THREADS_BIND": str(index % (os.cpu_count() or 1))} if device == "cpu" else {}
    return ray.remote(RolloutServer).options(
        num_cpus=c.cpus_per_rollout_server, num_gpus=placement.server_gpus,
        runtime_env={"env_vars": env | engine_env(sync.backend)},
        max_concurrency=100_000,  # a pause must never queue behind in-flight generate calls
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
    ).remote(index, model_path, job.model, r, sync, device, job.data.max_images_per_prompt)


def start_servers(job: JobConfig, device: str, model_path: str, sync: SyncConfig | None = None,
                  placement: Placement | None = None) -> tuple[list[Any], list[Any], Any]:
    import ray

    sync = sync or job_sync(job, device)
    placement = placement or plan_placement(job, device)
    pg = _placement_group(list(placement.rollout.bundles), "rollout")
    servers = [make_server(job, device, model_path, sync, placement, pg, i) for i in range(job.rollout.num_servers)]
    infos = ray.get([s.start.remote() for s in servers])
    return servers, infos, pg


def stop_servers(servers: list[Any], timeout_s: float = SHUTDOWN_S) -> None:
    """Shut the engines down (their GPU memory is free when this returns), before their actors are killed."""
    import ray

    refs = [s.shutdown.remote() for s in servers]
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)


def launch(job: JobConfig, device: str, model_path: str) -> Roles:
    """Rollout servers, trainer workers, the sample queue and the weight-sync coordinator."""
    import ray

    from verl_async.pipeline.queue import SampleQueue
    from verl_async.sync.coordinator import WeightSyncCoordinator

    placement = plan_placement(job, device)
    check_cluster(placement)  # seconds, not a placement-group timeout
    sync = job_sync(job, device)
    shared = None
    if placement.shared:  # the estimate needs only the model's config; the check runs in the trainer
        from verl_async.training.memory import plan_shared_gpu

        shared = plan_shared_gpu(model_path, job.model, job.trainer, job.algorithm, sync, job.cluster, job.rollout)
    # Servers first: vLLM sizes its KV cache from the GPU memory it measures while it profiles, so on a
    # shared GPU the engine must be up before the trainer allocates anything (and the trainer then
    # checks what the engine left).
    servers, infos, rollout_pg = start_servers(job, device, model_path, sync, placement)
    try:
        trainer, trainer_pg = _start_trainer(job, device, model_path, placement, rollout_pg, shared)
    except BaseException:
        stop_servers(servers)
        for s in servers:
            ray.kill(s, no_restart=True)
        ray.util.remove_placement_group(rollout_pg)
        raise
    p = job.pipeline
    queue = ray.remote(SampleQueue).options(num_cpus=0).remote(capacity=p.batch_groups * (p.max_staleness + 2))
    coordinator = WeightSyncCoordinator(servers, trainer.sender, sync, pause_mode=p.pause_mode, device=device,
                                        workers_per_server=job.rollout.tensor_parallel_size)
    pgs = [rollout_pg] if trainer_pg is rollout_pg else [rollout_pg, trainer_pg]
    return Roles(servers, infos, trainer, queue, coordinator, pgs,
                 spawn_server=functools.partial(make_server, job, device, model_path, sync, placement, rollout_pg))


def _start_trainer(job: JobConfig, device: str, model_path: str, placement: Placement, rollout_pg: Any,
                   shared: Any) -> tuple[Any, Any]:
    """The trainer group, in its own placement group or (shared GPU) in the servers' bundles."""
    import ray

    from verl_async.training.group import TrainerGroup

    pg = rollout_pg if placement.trainer is None else _placement_group(list(placement.trainer.bundles), "trainer")
    try:
        trainer = TrainerGroup(model_path, job.model, job.trainer, job.algorithm, job.pipeline.total_steps, device,
                               temperature=job.rollout.temperature, cpus_per_worker=job.cluster.cpus_per_trainer_worker,
                               placement_group=pg, gpus_per_worker=placement.worker_gpus, shared_gpu=shared)
    except BaseException:
        if pg is not rollout_pg:
            ray.util.remove_placement_group(pg)
        raise
    return trainer, pg


def start_rollouter(job: JobConfig, roles: Roles, model_path: str, start) -> None:
    """The rollouter begins where the checkpoint left off (data position, rows in flight)."""
    import ray

    from verl_async.pipeline.rollouter import Rollouter

    roles.rollouter = ray.remote(Rollouter).options(num_cpus=0).remote(
        roles.servers, roles.server_infos, model_path, job.rollout, job.data, job.pipeline, job.algorithm,
        roles.queue, engine_version=start.step, position=start.position, pending_rows=start.pending_rows,
        restored_groups=len(start.queued_groups))
