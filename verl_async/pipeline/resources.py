"""What each role asks of the Ray cluster, and a check that the cluster can ever hold it.

Ray's placement groups wait for resources that may never exist; this module makes a job that asks for
more GPUs, CPUs or custom resources than the cluster has fail in seconds, naming each resource (needed
vs. the cluster's, per role) and the config keys that size it.

On a shared GPU (cluster.shared_gpu) the rollout server and the trainer worker go into one bundle that
holds the whole GPU and split it as Ray fractions (scheduling only: memory is split by
rollout.gpu_memory_utilization), so Ray hands both actors the same GPU.
"""

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from verl_async.config import JobConfig

logger = logging.getLogger(__name__)

SHARED_GPU_FRACTION = 0.5  # each actor's Ray GPU share inside a shared-GPU bundle
EPS = 1e-6


class ClusterTooSmallError(RuntimeError):
    """The cluster can never hold the job's placement groups. The message names resources and keys."""


@dataclass(frozen=True)
class RoleRequest:
    """One placement group: its bundles and the config keys (with values) that size them."""

    role: str
    bundles: tuple[dict[str, float], ...]
    sized_by: str

    def amount(self, resource: str) -> float:
        return sum(b.get(resource, 0.0) for b in self.bundles)


@dataclass(frozen=True)
class Placement:
    """Bundles per placement group and the GPU share of each actor."""

    rollout: RoleRequest  # one bundle per server (shared: one per server + its trainer worker)
    trainer: RoleRequest | None  # None: the workers go into the rollout bundles (shared GPU)
    server_gpus: float
    worker_gpus: float

    @property
    def shared(self) -> bool:
        return self.trainer is None

    @property
    def requests(self) -> list[RoleRequest]:
        return [self.rollout] + ([self.trainer] if self.trainer is not None else [])


def plan_placement(job: JobConfig, device: str) -> Placement:
    r, t, c = job.rollout, job.trainer, job.cluster
    cuda = device == "cuda"
    servers = f"rollout.num_servers={r.num_servers}"
    if cuda and c.shared_gpu:
        bundle = ({"CPU": float(c.cpus_per_rollout_server + c.cpus_per_trainer_worker), "GPU": 1.0}
                  | c.rollout_resources | c.trainer_resources)
        keys = (f"cluster.shared_gpu=true: one GPU per {servers}; CPUs cluster.cpus_per_rollout_server="
                f"{c.cpus_per_rollout_server} + cluster.cpus_per_trainer_worker={c.cpus_per_trainer_worker}")
        return Placement(RoleRequest("rollout + trainer (shared GPU)", (bundle,) * r.num_servers, keys), None,
                         SHARED_GPU_FRACTION, SHARED_GPU_FRACTION)
    server = ({"CPU": float(c.cpus_per_rollout_server)} | ({"GPU": float(r.tensor_parallel_size)} if cuda else {})
              | c.rollout_resources)  # custom resources pin a role to nodes (multi-node layouts)
    worker = ({"CPU": float(c.cpus_per_trainer_worker)} | ({"GPU": 1.0} if cuda else {}) | c.trainer_resources)
    tp = f" x rollout.tensor_parallel_size={r.tensor_parallel_size} GPUs" if cuda else ""
    rollout = RoleRequest("rollout", (server,) * r.num_servers,
                          f"{servers}{tp}, cluster.cpus_per_rollout_server={c.cpus_per_rollout_server} CPUs")
    trainer = RoleRequest("trainer", (worker,) * t.num_workers,
                          f"trainer.num_workers={t.num_workers}{' x 1 GPU' if cuda else ''}, "
                          f"cluster.cpus_per_trainer_worker={c.cpus_per_trainer_worker} CPUs")
    return Placement(rollout, trainer, float(r.tensor_parallel_size) if cuda else 0.0, 1.0 if cuda else 0.0)


def shortfalls(requests: Sequence[RoleRequest], totals: Mapping[str, float],
               nodes: Sequence[Mapping[str, float]] | None = None) -> list[str]:
    """Why `requests` can never be placed on a cluster with these totals and nodes (empty: they can).
    `nodes` None: check the totals only."""
    needed: dict[str, float] = {}
    for req in requests:
        for bundle in req.bundles:
            for res, n in bundle.items():
                needed[res] = needed.get(res, 0.0) + n
    problems = []
    for res, n in needed.items():
        have = totals.get(res, 0.0)
        if n > have + EPS:
            per_role = "; ".join(f"{q.role} {q.amount(res):g} ({q.sized_by})" for q in requests if q.amount(res))
            problems.append(f"{res}: the job needs {n:g}, the cluster has {have:g} (per role: {per_role})")
    if problems or nodes is None:
        return problems
    for req in requests:  # the totals suffice; each bundle must also fit on a single node
        for bundle in {tuple(sorted(b.items())) for b in req.bundles}:
            if not any(all(node.get(res, 0.0) + EPS >= n for res, n in bundle) for node in nodes):
                biggest = max(nodes, key=lambda nd: tuple(nd.get(res, 0.0) for res, _ in bundle), default={})
                largest = {res: biggest.get(res, 0.0) for res, _ in bundle}
                problems.append(f"{req.role}: one bundle needs {dict(bundle)} on one node, the largest node has "
                                f"{largest} ({req.sized_by})")
    return problems


def advice(problems: Sequence[str], placement: Placement) -> str:
    tips = ["lower rollout.num_servers / trainer.num_workers or the cluster.cpus_per_* keys", "or add nodes"]
    if any(p.startswith("GPU") for p in problems) and not placement.shared:
        tips.insert(1, "or share one GPU between the rollout engine and the trainer (cluster=gpu_1x1)")
    return "; ".join(tips) + "."


def check_cluster(placement: Placement) -> None:
    """Fail now, not after a placement-group timeout, when the connected Ray cluster is too small."""
    import ray

    totals = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    problems = shortfalls(placement.requests, totals, nodes)
    if problems:
        raise ClusterTooSmallError("the Ray cluster can never hold this job (it would wait for resources "
                                   "forever):\n  - " + "\n  - ".join(problems) + "\nTo fix: " + advice(problems, placement))
    available = ray.available_resources()
    busy = shortfalls(placement.requests, available)
    if busy:
        logger.warning("the cluster has the resources but other jobs hold some now; waiting for them: %s",
                       "; ".join(busy))
