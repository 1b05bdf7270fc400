"""Typed job config: one dataclass per concern, composed by Hydra, validated on load.

`register()` puts the schema into Hydra's ConfigStore once; `to_job_config()` turns a
composed DictConfig into the typed `JobConfig` (running every check) exactly once, at
the entry point. Components then receive only their own slice.
"""

from dataclasses import dataclass, field

from verl_async.config._check import ConfigError, check
from verl_async.config.algorithm import AlgorithmConfig
from verl_async.config.cluster import ClusterConfig
from verl_async.config.data import DataConfig
from verl_async.config.env import EnvConfig
from verl_async.config.logging import LoggingConfig
from verl_async.config.model import ModelConfig
from verl_async.config.pipeline import PipelineConfig
from verl_async.config.rollout import RolloutConfig, check_device
from verl_async.config.sync import SyncConfig
from verl_async.config.trainer import TrainerConfig

__all__ = [
    "AlgorithmConfig", "ClusterConfig", "ConfigError", "DataConfig", "EnvConfig", "JobConfig", "LoggingConfig",
    "ModelConfig", "PipelineConfig", "RolloutConfig", "SyncConfig", "TrainerConfig",
    "register", "to_job_config",
]


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output_dir: str = ""
    """Run folder for metrics, plots and checkpoints (empty: Hydra's run dir)."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir."""
    smoke: bool = False
    """Only start the engine, generate a few samples and print them (no training)."""

    def __post_init__(self) -> None:
        check(self.rollout.max_model_len_or_auto is None
              or self.rollout.max_model_len_or_auto > self.data.max_prompt_length,
              "rollout.max_model_len", self.rollout.max_model_len,
              f"it must exceed data.max_prompt_length={self.data.max_prompt_length}; raise it or use `auto`.")
        check(self.algorithm.advantage == "grpo" and self.rollout.n >= 2 or self.algorithm.advantage != "grpo",
              "rollout.n", self.rollout.n, "GRPO normalises within a group: use rollout.n >= 2.")
        if self.cluster.device != "auto":
            check_device(self.rollout, self.cluster.device)
        self._check_gpu_sharing()
        if self.cluster.device == "cuda":
            engines = self.rollout.num_servers * self.rollout.tensor_parallel_size
            check(self.cluster.rollout_gpus == engines, "cluster.rollout_gpus", self.cluster.rollout_gpus,
                  f"it must equal rollout.num_servers * rollout.tensor_parallel_size = {engines}.")
            check(self.cluster.trainer_gpus == self.trainer.num_workers, "cluster.trainer_gpus",
                  self.cluster.trainer_gpus, f"it must equal trainer.num_workers = {self.trainer.num_workers}.")
        self._check_gpu_sharing()

    def _check_gpu_sharing(self) -> None:
        """A shared GPU holds one engine and one trainer worker, and weights cross by CUDA IPC."""
        r, c = self.rollout, self.cluster
        if not c.shared_gpu:
            check(self.sync.backend != "ipc", "sync.backend", self.sync.backend,
                  "CUDA IPC needs the trainer and the engine on one GPU: set cluster.shared_gpu=true "
                  "(cluster=gpu_1x1), or use auto / nccl.")
            return
        one = (r.num_servers, r.tensor_parallel_size, self.trainer.num_workers) == (1, 1, 1)
        check(one, "cluster.shared_gpu", True,
              "one shared GPU holds one engine and one trainer worker: set rollout.num_servers=1, "
              "rollout.tensor_parallel_size=1 and trainer.num_workers=1 (or give each role its own GPUs, "
              "e.g. cluster=gpu_1x2).")
        check(self.sync.backend in ("auto", "ipc"), "sync.backend", self.sync.backend,
              "on a shared GPU weights move by CUDA IPC (NCCL cannot connect two ranks on one GPU): use auto or ipc.")
        check(r.gpu_memory_utilization <= 0.8, "rollout.gpu_memory_utilization", r.gpu_memory_utilization,
              "on a shared GPU it is the engine's share; leave the trainer the rest, e.g. 0.35.")


_registered = False


def register() -> None:
    """Register the schema as `job_schema` in Hydra's ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="job_schema", node=JobConfig)
    _registered = True


def to_job_config(cfg) -> JobConfig:
    """Convert a composed DictConfig to a validated JobConfig; raise ConfigError on bad values."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        job = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # type errors and unknown keys name their key path
        raise ConfigError(str(e).splitlines()[0] + f" (key: {e.full_key})") from e
    if not isinstance(job, JobConfig):
        raise ConfigError("the config does not use job_schema: put `- job_schema` first in its defaults list.")
    return job
