"""One-GPU evidence for issue 11: the real pipeline (verl_async.main.run, cluster=gpu_1x1: one vLLM engine
and one FSDP2 trainer on the same GPU, CUDA-IPC weight sync) for a list of scenarios, one after another in
one process, with one JSON summary per scenario.

Scenarios (name: Qwen3 shape, task, mode); equal samples per step everywhere:
  q06_digits_pr     0.6B  digits           partial_rollout
  q06_longtail_pr   0.6B  digits_longtail  partial_rollout
  q06_longtail_sb   0.6B  digits_longtail  sync_baseline     <- vs q06_longtail_pr: the async speedup
  q17_digits_pr     1.7B  digits           partial_rollout
  q17_longtail_pr   1.7B  digits_longtail  partial_rollout
  (not in the default list) q17_longtail_sb, q06_digits_async, q06_digits_streaming

Step 0 is a warm-up and is left out of every timing; the loop time (the timed steps) is reported
apart from start-up (Ray, engine start, trainer build, handshake) and tear-down. Models are random
Qwen3-shaped bf16 weights with the local tokenizer, built by build_gpu_model.py into --models-dir
(in a subprocess, so this process never holds GPU memory) unless already there.

    python3 benchmarks/pipeline_gpu.py [--scenarios default|all|name,name] [--steps 7] [--models-dir /tmp/models]
    .venv/bin/python benchmarks/pipeline_gpu.py --device cpu --scenarios q06_longtail_pr,q06_longtail_sb --steps 3

Prints one JSON line per scenario and a summary line; writes $OUT/pipeline_gpu.json (updated after
every scenario) when $OUT is set.
"""

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries the JSON

logger = logging.getLogger("pipeline_gpu")

MODES = {"pr": "partial_rollout", "sb": "sync_baseline", "async": "async", "streaming": "streaming"}
TASKS = {"digits": "digits", "longtail": "digits_longtail"}
SHAPES = {"q06": "0.6B", "q17": "1.7B"}
DEFAULT = ["q06_digits_pr", "q06_longtail_pr", "q06_longtail_sb", "q17_digits_pr", "q17_longtail_pr"]
EXTRA = ["q17_longtail_sb", "q06_digits_async", "q06_digits_streaming"]
SYNC_KEYS = ("sync/total_s", "sync/pause_s", "sync/start_s", "sync/transfer_s", "sync/finish_s", "sync/resume_s",
             "sync/gather_s", "sync/GBps", "sync/bytes", "sync/buckets", "sync/engine_wait_s")


@dataclass(frozen=True)
class Scenario:
    name: str
    shape: str  # q06 / q17
    task: str
    mode: str

    @classmethod
    def parse(cls, name: str) -> "Scenario":
        shape, task, mode = name.split("_")
        if shape not in SHAPES or task not in TASKS or mode not in MODES:
            raise SystemExit(f"unknown scenario {name!r}: use <{'|'.join(SHAPES)}>_<{'|'.join(TASKS)}>_"
                             f"<{'|'.join(MODES)}>, e.g. {DEFAULT[0]}")
        return cls(name, shape, TASKS[task], MODES[mode])


def longtail_rows(path: Path, cap: int, seed: int = 0) -> str:
    """The digits_longtail task with its Pareto budgets capped at `cap` instead of 256 (a GPU decodes
    256 tokens in about a second, too short a tail to matter), written as a data file."""
    from verl_async.data.rows import write_jsonl
    from verl_async.data.tasks import digits_longtail_task

    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(digits_longtail_task(2048, seed, max_tokens=cap), str(path))
    return str(path)


def overrides(sc: Scenario, args, model_path: str, out: Path) -> list[str]:
    """Hydra overrides of one scenario. GPU: cluster=gpu_1x1 with its defaults (engine share 0.35)."""
    data = [f"data.generated_task={sc.task}"]
    if sc.task == "digits_longtail":
        data = [f"data.train_files=[{longtail_rows(out.parent / 'longtail.jsonl', args.longtail_max_tokens)}]"]
    common = [f"output_dir={out}", f"pipeline={sc.mode}", f"pipeline.total_steps={args.steps}",
              *data, "logging.wandb_mode=disabled", "logging.progress_bar=false",
              "logging.plots=false", "trainer.save_at_end=false", "trainer.warmup_steps=0"]
    if args.device == "cpu":  # the CPU smoke run: the tiny model, the default CPU cluster
        return common + ["model.path=tiny", "pipeline.batch_groups=4", "rollout.n=4", "rollout.response_length=32"]
    return common + [
        "rollout=gpu", "trainer=gpu", "cluster=gpu_1x1", f"model.path={model_path}", "model.dtype=bfloat16",
        "data.max_prompt_length=64", "rollout.max_model_len=2048", f"rollout.response_length={args.response_length}",
        f"pipeline.batch_groups={args.longtail_groups if sc.task == 'digits_longtail' else args.digits_groups}",
        "rollout.n=8", "trainer.lr=1e-5", *args.extra]


def ensure_model(shape: str, models_dir: Path) -> str:
    path = models_dir / shape
    if not (path / "config.json").exists():
        t0 = time.monotonic()
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "build_gpu_model.py"), "--shape", SHAPES[shape],
                        "--out", str(path)], check=True)
        logger.info("built %s in %.0f s", path, time.monotonic() - t0)
    return str(path)


def wait_for_free_gpu(timeout_s: float = 90.0, used_mib: int = 2048) -> float:
    """Wait until the last scenario's engine and trainer have released the GPU (nvidia-smi; no CUDA here)."""
    t0 = time.monotonic()
    if shutil.which("nvidia-smi") is None:
        return 0.0
    while time.monotonic() - t0 < timeout_s:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout.split()
        if out and max(int(x) for x in out) < used_mib:
            break
        time.sleep(1.0)
    return time.monotonic() - t0


def run_scenario(sc: Scenario, args) -> dict:
    from hydra import compose, initialize_config_dir

    from verl_async.config import register, to_job_config
    from verl_async.main import run

    out = Path(args.out) / sc.name
    shutil.rmtree(out, ignore_errors=True)
    model = "tiny" if args.device == "cpu" else ensure_model(sc.shape, Path(args.models_dir))
    register()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        job = to_job_config(compose(config_name="config", overrides=overrides(sc, args, model, out)))
    t0 = time.monotonic()
    final = run(job)
    wall = time.monotonic() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summarize(sc, job, [r for r in records if "final" not in r], final, wall)


def _mean(values: list[float]) -> float:
    """Mean of the finite values (a rollout-window metric is nan in a step where no group finished)."""
    finite = [v for v in values if v == v]
    return float(statistics.fmean(finite)) if finite else float("nan")


def summarize(sc: Scenario, job, steps: list[dict], final: dict, wall: float) -> dict:
    timed = steps[1:]  # step 0: warm-up
    loop = sum(r["perf/step_s"] for r in timed)
    third = max(len(steps) // 3, 1)
    syncs = [r for r in timed if "sync/total_s" in r]
    return {
        "scenario": sc.name, "shape": SHAPES[sc.shape] if job.cluster.device == "cuda" else "tiny", "task": sc.task,
        "mode": sc.mode, "steps": len(steps), "timed_steps": len(timed),
        "samples_per_step": job.pipeline.batch_groups * job.rollout.n,
        "wall_s": round(wall, 1), "startup_and_teardown_s": round(wall - sum(r["perf/step_s"] for r in steps), 1),
        "warmup_step_s": round(steps[0]["perf/step_s"], 2), "loop_s": round(loop, 2),
        "step_s_mean": round(loop / max(len(timed), 1), 3),
        "rollout_tokens_per_s": round(sum(r["rollout/tokens"] for r in timed) / max(loop, 1e-9), 1),
        "trainer_tokens_per_s": round(_mean([r["perf/trainer_tokens_per_s"] for r in timed]), 1),
        "trained_tokens": sum(r["train/tokens"] for r in timed),  # equal samples need not mean equal tokens
        "trained_tokens_per_loop_s": round(sum(r["train/tokens"] for r in timed) / max(loop, 1e-9), 1),
        "train_step_s_mean": round(_mean([r["train/step_s"] for r in timed]), 3),
        "trainer_idle_ratio": round(_mean([r["perf/trainer_idle_ratio"] for r in timed]), 3),
        "rollout_idle_ratio": round(_mean([r["perf/rollout_idle_ratio"] for r in timed]), 3),
        "sync_median": {k.removeprefix("sync/"): round(statistics.median(r[k] for r in syncs), 4)
                        for k in SYNC_KEYS if syncs and all(k in r for r in syncs)},
        "syncs": int(final.get("sync/count", 0)),
        "staleness_max": max(r["staleness/max"] for r in steps), "staleness_mean": round(_mean(
            [r["staleness/mean"] for r in steps]), 3),
        "reward_first": steps[0]["train/reward_mean"], "reward_last": steps[-1]["train/reward_mean"],
        "reward_first_third": round(_mean([r["rollout/reward_mean"] for r in steps[:third]]), 4),
        "reward_last_third": round(_mean([r["rollout/reward_mean"] for r in steps[-third:]]), 4),
        "response_len_mean": round(_mean([r["rollout/response_len_mean"] for r in timed]), 1),
        "mismatch_kl_step0": steps[0].get("train/mismatch_kl"),
        "token_conservation_errors": final.get("rollout/token_conservation_errors"),
        "version_attribution_errors": final.get("rollout/version_attribution_errors"),
        "ledger": {k.removeprefix("ledger/"): v for k, v in final.items() if k.startswith("ledger/")},
    }


def comparisons(results: dict[str, dict]) -> dict:
    """partial_rollout vs sync_baseline loop time, for every shape/task run in both modes."""
    out = {}
    for name, r in results.items():
        base = name.removesuffix("_pr") + "_sb"
        if name.endswith("_pr") and base in results and "loop_s" in r and "loop_s" in results[base]:
            b = results[base]
            out[f"{name} vs {base}"] = {
                "loop_speedup": round(b["loop_s"] / r["loop_s"], 2), "target": 1.3,
                "trained_tokens_per_s_ratio": round(r["trained_tokens_per_loop_s"] / b["trained_tokens_per_loop_s"], 2)}
    return out


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="default", help="default, all, or comma-separated names")
    p.add_argument("--steps", type=int, default=7, help="steps per scenario (step 0 is a warm-up)")
    p.add_argument("--digits-groups", type=int, default=16, help="digits: groups per step (x rollout.n=8 samples)")
    p.add_argument("--longtail-groups", type=int, default=32, help="longtail: groups per step (x rollout.n=8)")
    p.add_argument("--response-length", type=int, default=256, help="digits budget; longtail has its own")
    p.add_argument("--longtail-max-tokens", type=int, default=1024, help="cap of the long-tail Pareto budgets")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: smoke run on the tiny model")
    p.add_argument("--models-dir", default="/tmp/verl_async_models")
    p.add_argument("--out", default="/tmp/verl_async_pipeline_gpu")
    p.add_argument("extra", nargs="*", help="extra Hydra overrides for every GPU scenario")
    args = p.parse_args()
    names = {"default": DEFAULT, "all": DEFAULT + EXTRA}.get(args.scenarios) or args.scenarios.split(",")
    args.scenarios = [Scenario.parse(n) for n in names]
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t0 = time.monotonic()
    results: dict[str, dict] = {}
    for i, sc in enumerate(args.scenarios):
        if args.device == "cuda" and i:
            logger.info("waited %.1f s for the GPU to be released", wait_for_free_gpu())
        try:
            results[sc.name] = run_scenario(sc, args)
        except Exception as exc:  # one failed scenario is reported; the others still run
            logger.exception("scenario %s failed", sc.name)
            last = (str(exc).strip().splitlines() or [""])[-1]
            results[sc.name] = {"scenario": sc.name, "error": f"{type(exc).__name__}: {last}"}
        print(json.dumps(results[sc.name]), flush=True)  # noqa: T201 - a benchmark prints its JSON
        _write(results, t0)
    summary = {"comparisons": comparisons(results), "wall_s": round(time.monotonic() - t0, 1),
               "failed": [n for n, r in results.items() if "error" in r]}
    print(json.dumps({"summary": summary}), flush=True)  # noqa: T201
    _write(results, t0, summary)
    if summary["failed"]:
        raise SystemExit(1)


def _write(results: dict, t0: float, summary: dict | None = None) -> None:
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "pipeline_gpu.json"), "w") as f:
            json.dump({"results": results, "summary": summary, "elapsed_s": round(time.monotonic() - t0, 1)}, f,
                      indent=1)


if __name__ == "__main__":
    main()
