"""Start Ray (or join the cluster this job runs in) and place every role on its own resources.

Rollout servers and trainer workers get separate placement groups sized from the cluster
config (GPUs on cuda; CPU cores on a CPU machine, one vLLM engine bound per core).
"""

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from verl_async.config import JobConfig

logger = logging.getLogger(__name__)


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


def make_server(job: JobConfig, device: str, model_path: str, pg: Any, index: int) -> Any:
    """RolloutServer actor `index` in bundle `index` of the rollout placement group (call start() on it)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from verl_async.rollout.server import RolloutServer

    r, c = job.rollout, job.cluster
    gpus = r.tensor_parallel_size if device == "cuda" else 0
    env = {"VLLM_CPU_OMP_THREADS_BIND": str(index % (os.cpu_count() or 1))} if device == "cpu" else {}
    return ray.remote(RolloutServer).options(
        num_cpus=c.cpus_per_rollout_server, num_gpus=gpus, runtime_env={"env_vars": env},
        max_concurrency=100_000,  # a pause must never queue behind in-flight generate calls
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
    ).remote(index, model_path, job.model, r, job.sync, device, job.data.max_images_per_prompt)


def start_servers(job: JobConfig, device: str, model_path: str) -> tuple[list[Any], list[Any], Any]:
    import ray

    r, c = job.rollout, job.cluster
    gpus = r.tensor_parallel_size if device == "cuda" else 0
    bundle = {"CPU": c.cpus_per_rollout_server, **({"GPU": gpus} if gpus else {}), **c.rollout_resources}
    pg = _placement_group([bundle] * r.num_servers, "rollout")
    servers = [make_server(job, device, model_path, pg, i) for i in range(r.num_servers)]
    infos = ray.get([s.start.remote() for s in servers])
    return servers, infos, pg


def launch(job: JobConfig, device: str, model_path: str) -> Roles:
    """Rollout servers, trainer workers, the sample queue and the weight-sync coordinator."""
    import ray

    from verl_async.pipeline.queue import SampleQueue
    from verl_async.sync.coordinator import WeightSyncCoordinator
    from verl_async.training.group import TrainerGroup

    servers, infos, rollout_pg = start_servers(job, device, model_path)
    c = job.cluster
    bundle = {"CPU": c.cpus_per_trainer_worker, **({"GPU": 1} if device == "cuda" else {}), **c.trainer_resources}
    trainer_pg = _placement_group([bundle] * job.trainer.num_workers, "trainer")
    trainer = TrainerGroup(model_path, job.model, job.trainer, job.algorithm, job.pipeline.total_steps, device,
                           temperature=job.rollout.temperature, cpus_per_worker=c.cpus_per_trainer_worker,
                           placement_group=trainer_pg)
    p = job.pipeline
    queue = ray.remote(SampleQueue).options(num_cpus=0).remote(capacity=p.batch_groups * (p.max_staleness + 2))
    coordinator = WeightSyncCoordinator(servers, trainer.sender, job.sync, pause_mode=p.pause_mode, device=device,
                                        workers_per_server=job.rollout.tensor_parallel_size)
    return Roles(servers, infos, trainer, queue, coordinator, [rollout_pg, trainer_pg],
                 spawn_server=functools.partial(make_server, job, device, model_path, rollout_pg))


def start_rollouter(job: JobConfig, roles: Roles, model_path: str, start) -> None:
    """The rollouter begins where the checkpoint left off (data position, rows in flight)."""
    import ray

    from verl_async.pipeline.rollouter import Rollouter

    roles.rollouter = ray.remote(Rollouter).options(num_cpus=0).remote(
        roles.servers, roles.server_infos, model_path, job.rollout, job.data, job.pipeline, job.algorithm,
        roles.queue, engine_version=start.step, position=start.position, pending_rows=start.pending_rows,
        restored_groups=len(start.queued_groups))
