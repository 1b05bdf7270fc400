"""The `verl-async` command: a Hydra app whose config is validated once, here, then run.

    verl-async                          # the CPU quickstart (configs/config.yaml)
    verl-async pipeline=sync_baseline   # any override, as in any Hydra app
    verl-async --cfg job                # print the resolved config
    verl-async --config-dir recipes --config-name qwen3_gsm8k
"""

import logging
import os

import hydra
from omegaconf import DictConfig

from verl_async.config import ConfigError, JobConfig, register, to_job_config

logger = logging.getLogger("verl_async")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

register()


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(job: JobConfig) -> dict[str, float]:
    """Run the job described by a validated config; returns the final metrics."""
    from verl_async.config._check import check
    from verl_async.config.rollout import check_device
    from verl_async.preflight import preflight

    device = resolve_device(job.cluster.device)
    check_device(job.rollout, device)
    check(not (job.cluster.shared_gpu and device != "cuda"), "cluster.shared_gpu", True,
          "no GPU is visible: a shared GPU needs CUDA (use cluster=cpu on a CPU machine).")
    preflight(job)  # import paths, files and assets: before Ray and vLLM start
    if job.smoke:
        from verl_async.smoke import run_smoke

        return run_smoke(job, device)
    from verl_async.pipeline.driver import run_pipeline

    return run_pipeline(job, device)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _main(cfg: DictConfig) -> None:
    try:
        job = to_job_config(cfg)
    except ConfigError as e:
        logger.error("invalid config: %s", e)
        raise SystemExit(2) from None
    if not job.output_dir:
        from hydra.core.hydra_config import HydraConfig

        job.output_dir = HydraConfig.get().runtime.output_dir
    logging.getLogger().setLevel(job.logging.level)
    from verl_async.pipeline.driver import PipelineError

    try:
        run(job)
    except ConfigError as e:  # found by the preflight checks
        logger.error("invalid config: %s", e)
        raise SystemExit(2) from None
    except PipelineError as e:
        logger.error("%s", e)
        raise SystemExit(1) from None


def cli() -> None:
    _main()


if __name__ == "__main__":
    cli()
