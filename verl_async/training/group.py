"""The trainer as one object: trainer.num_workers TrainerWorker Ray actors in one process group.

Every call fans out to all ranks (they must all take part in the collectives) and returns
rank 0's result. `sender` is what the weight-sync coordinator talks to (async: a hung transfer
is abandoned by the coordinator's deadline, never left blocking a thread). Blocking methods
have `*_async` twins (awaiting the Ray refs) for callers that run an event loop. A rank that
dies raises TrainerRankDied; `shutdown` never waits long on ranks stuck in a collective.
"""

import asyncio
import logging
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from verl_async.config.algorithm import AlgorithmConfig
from verl_async.config.model import ModelConfig
from verl_async.config.trainer import TrainerConfig
from verl_async.training.worker import TrainerWorker
from verl_async.types import TensorMeta, TrainBatch, TrainMetrics, TrainRow

logger = logging.getLogger(__name__)
SHUTDOWN_GRACE_S = 10.0  # ranks get this long to leave their process group before they are killed


class TrainerRankDied(RuntimeError):
    """A trainer worker process is gone (killed, OOM, node lost): the run cannot continue without it."""

    def __init__(self, rank: int, cause: BaseException):
        super().__init__(f"trainer rank {rank} died ({type(cause).__name__}: "
                         f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''})")
        self.rank = rank


def gather(refs: list[Any]) -> list[Any]:
    """ray.get that fails fast: the first rank to raise is reported at once, instead of waiting
    on ranks that will sit in a collective until its timeout. A dead rank raises TrainerRankDied."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(ready)
        except ray.exceptions.RayActorError as e:
            raise TrainerRankDied(refs.index(ready[0]), e) from e
    return ray.get(refs)


async def gather_async(refs: list[Any]) -> list[Any]:
    """`gather` for callers with an event loop (rank order kept)."""
    futures = [asyncio.wrap_future(ref.future()) for ref in refs]
    try:
        return await asyncio.gather(*futures)
    except ray.exceptions.RayActorError as e:
        dead = next((i for i, f in enumerate(futures)
                     if f.done() and not f.cancelled() and isinstance(f.exception(), type(e))), 0)
        raise TrainerRankDied(dead, e) from e


class TrainerGroup:
    """Spawns the workers (1 GPU each on cuda; cpus_per_worker CPUs each) and sets them up.

    placement_group: optional Ray placement group; worker i goes to bundle bundle_offset + i.
    temperature: the rollout's sampling temperature (the trainer's log-probs must use the same).
    gpus_per_worker: the Ray GPU share of each worker on cuda (a fraction when it shares its GPU).
    shared_gpu: memory.SharedGpuPlan when the GPU is shared with an engine: checked (and the workers'
    memory capped) before anything is built.
    """

    def __init__(self, model_path: str, model: ModelConfig, trainer: TrainerConfig, algorithm: AlgorithmConfig,
                 total_steps: int, device: str, *, temperature: float = 1.0, cpus_per_worker: int = 1,
                 placement_group: Any = None, bundle_offset: int = 0, gpus_per_worker: float = 1.0,
                 shared_gpu: Any = None):
        n = trainer.num_workers
        actor_cls = ray.remote(TrainerWorker)
        self.workers = []
        for rank in range(n):
            options: dict[str, Any] = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker if device == "cuda" else 0}
            if placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=bundle_offset + rank)
            self.workers.append(actor_cls.options(**options).remote(
                rank, n, model_path, model, trainer, algorithm, total_steps, device, temperature))
        if shared_gpu is not None:
            gather([w.check_gpu_memory.remote(shared_gpu) for w in self.workers])
        address, port = ray.get(self.workers[0].rendezvous_address.remote())
        gather([w.setup.remote(address, port) for w in self.workers])
        self.sender = WeightSenderGroup(self.workers)
        logger.info("trainer group up: %d worker(s) on %s, rendezvous %s:%d", n, device, address, port)

    def _all(self, method: str, *args: Any) -> list[Any]:
        """Call `method` on every worker; return the refs in rank order."""
        return [getattr(w, method).remote(*args) for w in self.workers]

    def _rank0(self, method: str, *args: Any) -> Any:
        return gather(self._all(method, *args))[0]

    def train_step(self, batch: TrainBatch) -> TrainMetrics:
        return self._rank0("train_step", ray.put(batch))

    async def train_step_async(self, batch: TrainBatch) -> TrainMetrics:
        return (await gather_async(self._all("train_step", ray.put(batch))))[0]

    def compute_logprobs(self, rows: list[TrainRow]) -> list[list[float]]:
        return self._rank0("compute_logprobs", ray.put(rows))

    def save_checkpoint(self, path: str, extra_state: dict[str, Any]) -> None:
        self._rank0("save_checkpoint", path, extra_state)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Restore all ranks; return the pipeline's extra_state."""
        return self._rank0("load_checkpoint", path)

    def export_hf(self, path: str) -> None:
        self._rank0("export_hf", path)

    def state(self) -> dict[str, int]:
        """{"step": ..., "policy_version": ...} of rank 0."""
        return ray.get(self.workers[0].state.remote())

    def shutdown(self) -> None:
        """Leave the process group and stop every rank; a rank busy in a hung collective (or dead) is
        killed after SHUTDOWN_GRACE_S instead of blocking the caller."""
        refs = self._all("shutdown")
        _, stuck = ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_GRACE_S)
        if stuck:
            logger.warning("%d trainer rank(s) did not shut down within %.0f s: killing them", len(stuck),
                           SHUTDOWN_GRACE_S)
        for w in self.workers:
            ray.kill(w)
        self.workers = []


class WeightSenderGroup:
    """The trainer side of a weight sync: all ranks gather, rank 0 sends; results are rank 0's.
    Async, so the coordinator awaits Ray refs directly and abandons them at its deadline."""

    def __init__(self, workers: list[Any]):
        self.workers = workers

    async def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0's node address and a port free there: the transfer group's rendezvous."""
        return (await gather_async([self.workers[0].rendezvous_address.remote()]))[0]

    async def tensor_metas(self) -> list[TensorMeta]:
        return (await gather_async([self.workers[0].tensor_metas.remote()]))[0]

    async def init_weight_sender(self, backend: str, master_address: str, master_port: int, world_size: int,
                                 timeout_s: float, servers: list | None = None) -> None:
        await gather_async([w.init_weight_sender.remote(backend, master_address, master_port, world_size, timeout_s,
                                                        servers) for w in self.workers])

    async def send_weights(self, bucket_bytes: int) -> dict[str, float]:
        return (await gather_async([w.send_weights.remote(bucket_bytes) for w in self.workers]))[0]
