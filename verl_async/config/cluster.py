"""Where the roles run: Ray address and resources per role."""

from dataclasses import dataclass, field

from verl_async.config._check import check, check_choice


@dataclass
class ClusterConfig:
    address: str = "auto"
    """Ray address: auto (join the cluster this job runs in, else start a local one), local, or host:port."""
    device: str = "auto"
    """auto (cuda when a GPU is visible), cuda or cpu."""
    nodes: int = 1
    """Nodes in the cluster."""
    rollout_gpus: int = 0
    """GPUs for the rollout servers (num_servers * tensor_parallel_size); 0 on CPU."""
    trainer_gpus: int = 0
    """GPUs for the trainer workers (one per worker); 0 on CPU."""
    cpus_per_rollout_server: int = 1
    """CPU cores reserved for each rollout server."""
    cpus_per_trainer_worker: int = 1
    """CPU cores reserved for each trainer worker."""
    shared_gpu: bool = False
    """cuda: the rollout engine and the trainer worker share one GPU, both live at once (one server, one
    worker; rollout_gpus and trainer_gpus both count that GPU). The engine takes rollout.gpu_memory_utilization
    of its memory and starts first; the trainer gets the rest. Weights move by CUDA IPC (sync.backend=auto)."""
    memory_check: bool = True
    """shared_gpu: refuse to start when the trainer's estimated memory does not fit beside the engine
    (false: skip the estimate; the trainer's memory is still capped so it cannot take the engine's)."""
    rollout_resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources each rollout server's placement bundle asks for, e.g. {rollout_node: 1} to put
    the servers on nodes started with `ray start --resources='{"rollout_node": 8}'` (multi-node layouts)."""
    trainer_resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources each trainer worker's placement bundle asks for (see rollout_resources)."""

    def __post_init__(self) -> None:
        check_choice("cluster.device", self.device, ("auto", "cuda", "cpu"))
        check(self.nodes >= 1, "cluster.nodes", self.nodes, "use at least 1.")
        check(self.rollout_gpus >= 0 and self.trainer_gpus >= 0, "cluster.rollout_gpus/trainer_gpus",
              (self.rollout_gpus, self.trainer_gpus), "use 0 or more.")
        check(self.cpus_per_rollout_server >= 1, "cluster.cpus_per_rollout_server", self.cpus_per_rollout_server, "use at least 1.")
        check(not (self.shared_gpu and self.device == "cpu"), "cluster.shared_gpu", self.shared_gpu,
              "a shared GPU needs cluster.device=cuda (or auto on a GPU machine); use false on CPU.")
        check(self.cpus_per_trainer_worker >= 1, "cluster.cpus_per_trainer_worker", self.cpus_per_trainer_worker, "use at least 1.")
        for key, extra in (("cluster.rollout_resources", self.rollout_resources),
                           ("cluster.trainer_resources", self.trainer_resources)):
            check(all(v > 0 for v in extra.values()) and not {"CPU", "GPU"} & set(extra), key, extra,
                  "give custom resource names with positive amounts (CPUs and GPUs come from the other keys).")
