"""Synchronous RL vs partial-rollout async RL on the same long-tail workload (CPU, tiny model).

Per-prompt budgets follow a Pareto tail (data task digits_longtail): most answers are short,
a few run long. Synchronous RL waits for the slowest sample of every batch; partial rollout
keeps generating across syncs. Prints JSON: wall time, tokens/s and reward for each mode,
and the speedup.

    .venv/bin/python benchmarks/async_vs_sync.py [--steps 12] [--out /tmp/bench] [--json result.json]

Ray forwards worker logs to stdout as well: the JSON is the last object printed, and `--json`
also writes it to a file.
"""

import argparse
import json
import logging
import time
from pathlib import Path


def run_mode(mode: str, steps: int, out: Path, extra: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    from verl_async.config import register, to_job_config
    from verl_async.main import run

    register()
    configs = Path(__file__).resolve().parents[1] / "configs"
    staleness = "0" if mode == "sync_baseline" else "1"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"pipeline={mode}", f"pipeline.total_steps={steps}", f"pipeline.max_staleness={staleness}",
            "data.generated_task=digits_longtail", "rollout.response_length=256", f"output_dir={out / mode}",
            "logging.wandb_mode=disabled", "logging.progress_bar=false", "logging.plots=false", *extra])
    job = to_job_config(cfg)
    t0 = time.monotonic()
    final = run(job)
    wall = time.monotonic() - t0
    records = [json.loads(ln) for ln in (out / mode / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "final" not in r]
    loop_s = sum(r["perf/step_s"] for r in steps_)
    tokens = sum(r["rollout/tokens"] for r in steps_)
    return {"mode": mode, "wall_s": round(wall, 2), "loop_s": round(loop_s, 2),
            "tokens_per_s": round(tokens / loop_s, 1), "reward_first": steps_[0]["train/reward_mean"],
            "reward_last": steps_[-1]["train/reward_mean"],  # the trained batch's (defined every step)
            "trainer_idle_ratio": round(sum(r["perf/trainer_idle_ratio"] for r in steps_) / len(steps_), 3),
            "staleness_max": final["staleness/max"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default="/tmp/verl_async_bench")
    p.add_argument("--json", default=None, help="also write the result to this file")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    sync = run_mode("sync_baseline", args.steps, out, args.overrides)
    partial = run_mode("partial_rollout", args.steps, out, args.overrides)
    result = {"workload": "digits_longtail (Pareto budgets, 8..256 tokens)", "steps": args.steps,
              "sync_baseline": sync, "partial_rollout": partial,
              "speedup_loop": round(sync["loop_s"] / partial["loop_s"], 2)}
    text = json.dumps(result, indent=2)
    print(text)  # noqa: T201 - a benchmark prints its JSON
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
