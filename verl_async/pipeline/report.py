"""What the user sees: a live progress bar, a metrics line per step, metrics.jsonl, wandb
(offline by default) and PNG plots at the end."""

import json
import logging
import math
import os
from pathlib import Path

from verl_async.config import LoggingConfig

logger = logging.getLogger(__name__)

PLOTS = {"reward": "rollout/reward_mean", "response_len": "rollout/response_len_mean", "loss": "train/loss"}
CONSOLE_KEYS = ["rollout/reward_mean", "rollout/response_len_mean", "train/loss", "train/mismatch_kl",
                "staleness/max", "queue/depth", "sync/total_s", "perf/tokens_per_s"]


def _fmt(v: float) -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4g}"


class Reporter:
    def __init__(self, cfg: LoggingConfig, output_dir: str, total_steps: int, config_dict: dict, start_step: int = 0):
        self.cfg = cfg
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (self.dir / "metrics.jsonl").open("a")
        self.history: list[dict[str, float]] = []
        self.wandb = None
        if cfg.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=cfg.project, name=cfg.run_name or self.dir.name, dir=str(self.dir),
                                    mode=cfg.wandb_mode, config=config_dict, resume="allow")
        self.bar = None
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="verl_async", dynamic_ncols=True)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        live = (f"reward {_fmt(metrics.get('rollout/reward_mean', float('nan')))} "
                f"tok/s {_fmt(metrics.get('perf/tokens_per_s', 0.0))} "
                f"stale {_fmt(metrics.get('staleness/max', 0.0))} "
                f"sync {_fmt(metrics.get('sync/total_s', float('nan')))}s")
        if self.bar is not None:
            self.bar.set_postfix_str(live, refresh=False)
            self.bar.update(1)
        if self.cfg.console:
            line = " ".join(f"{k}={_fmt(metrics[k])}" for k in CONSOLE_KEYS if k in metrics)
            logger.info("step %d %s", step, line)

    def final(self, metrics: dict[str, float]) -> None:
        """The last line of a run: final metrics, and where everything is."""
        self.jsonl.write(json.dumps({"final": True, **metrics}) + "\n")
        self.jsonl.flush()
        logger.info("final metrics: %s", json.dumps({k: round(v, 6) for k, v in metrics.items()}, sort_keys=True))

    def plot(self) -> list[str]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        written = []
        for name, key in PLOTS.items():
            points = [(r["step"], r[key]) for r in self.history if key in r and not math.isnan(r[key])]
            if not points:
                continue
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(*zip(*points, strict=True), marker=".")
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = self.dir / f"{name}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(str(path))
        return written

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
