"""Helpers shared by the end-to-end pipeline tests: compose a job from the real `configs/`
(as the CLI does) and read back what a run wrote to its `metrics.jsonl`."""

import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from verl_async.config import JobConfig, register, to_job_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
register()


def compose_job(out: Path, *overrides: str) -> JobConfig:
    """The default config plus `overrides`, writing to `out`, with no wandb and no progress bar."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"output_dir={out}", "logging.wandb_mode=disabled", "logging.progress_bar=false", *overrides])
    return to_job_config(cfg)


def read_metrics(out: Path) -> tuple[list[dict], dict]:
    """(one record per step, the last final-metrics record) from `out/metrics.jsonl`."""
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "final" not in r], [r for r in lines if "final" in r][-1]
