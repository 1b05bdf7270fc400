"""GPU evidence for issue 7: the whole pipeline on a Qwen3-VL-2B-shaped model (random weights, bf16)
on two GPUs: one vLLM engine (GPU 0) and one FSDP2 trainer worker (GPU 1), NCCL weight sync every
step, partial rollout, on the generated colours task (one image per prompt, 32-160 px a side).

Nothing is downloaded: the model is built from Qwen3-VL-2B's published layer shapes
(verl_async.assets.vl.SHAPES["2b"]) with the local tiny tokenizer and a saved Qwen3VLProcessor.
Prints one JSON object: per-step sync phases (s), sync bandwidth, rollout tokens/s, the
vision-token prompt-length check against vLLM (mismatches must be 0), the trainer-vs-engine
mismatch KL on on-policy steps, and whether every vision-tower tensor was trained.

    python3 benchmarks/vl_pipeline_gpu.py [--steps 6] [--out /tmp/vl_gpu] [extra Hydra overrides]

Works with vLLM 0.26 (the GPU kit) and 0.32; Python 3.12; transformers 5.17+.
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("vl_pipeline_gpu")


def build_model(out: Path) -> float:
    from verl_async.assets.vl import build_vl

    if (out / "config.json").exists():
        return 0.0
    t0 = time.monotonic()
    build_vl(out, seed=0, shape="2b", dtype="bfloat16", device="cuda")
    return time.monotonic() - t0


def run_pipeline(model: Path, out: Path, steps: int, dtype: str, lr: float, extra: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    from verl_async.config import register, to_job_config
    from verl_async.main import run

    register()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model.path={model}", f"model.dtype={dtype}", "data=colours", "data.max_prompt_length=512",
            "rollout=gpu", "trainer=gpu", "cluster=gpu_1x2", "pipeline=partial_rollout",
            f"pipeline.total_steps={steps}", "pipeline.batch_groups=16", "pipeline.max_staleness=1",
            "rollout.n=8", "rollout.response_length=256", "rollout.max_model_len=2048",
            "rollout.gpu_memory_utilization=0.6", f"trainer.lr={lr}", "trainer.micro_batch_max_tokens=8192",
            "trainer.checkpoint_every_steps=0", f"output_dir={out}", "logging.wandb_mode=disabled",
            "logging.progress_bar=false", "logging.plots=false", *extra])
    job = to_job_config(cfg)
    t0 = time.monotonic()
    final = run(job)
    wall = time.monotonic() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "final": final, "steps": [r for r in records if "final" not in r]}


def vision_tower_trained(model: Path, out: Path, lr: float, steps: int) -> dict:
    """Which vision tensors moved between the initial and the exported weights (both in model.dtype).
    In bf16 a weight near 1.0 (LayerNorm gains) moves only once its updates (about lr per Adam step)
    pass half the bf16 spacing there (2**-8): the check says whether every unchanged tensor is such a case."""
    import torch
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        found = {}
        for f in sorted(folder.glob("*.safetensors")):
            found |= load_file(f)
        return found

    before, after = tensors(model), tensors(out / "hf")
    vision = [k for k in before if k.startswith("model.visual.") and "pos_embed" not in k]
    unchanged = [k for k in vision if torch.equal(before[k].to(after[k].dtype), after[k])]
    below_resolution = all(
        after[k].dtype == torch.bfloat16 and "norm" in k and float((before[k].float() - 1).abs().max()) < 0.5
        and lr * steps < 2 ** -8 for k in unchanged)
    return {"vision_tensors": len(vision), "vision_changed": len(vision) - len(unchanged),
            "vision_unchanged": unchanged[:8], "vision_unchanged_explained_by_bf16_spacing": below_resolution,
            "all_vision_trained": not unchanged}


def summarise(res: dict, build_s: float) -> dict:
    steps, final = res["steps"], res["final"]
    later = steps[1:] or steps  # step 0 includes warm-up
    mean = lambda key, rows=later: round(sum(r[key] for r in rows) / len(rows), 4)  # noqa: E731
    on_policy = [r["train/mismatch_kl"] for r in steps if r["staleness/max"] == 0]
    return {
        "model": "Qwen3-VL-2B shape, random bf16 weights", "build_s": round(build_s, 1),
        "steps": len(steps), "wall_s": round(res["wall_s"], 1),
        "sync_per_step": [{k.removeprefix("sync/"): round(r[k], 4) for k in (
            "sync/pause_s", "sync/transfer_s", "sync/finish_s", "sync/resume_s", "sync/total_s") if k in r}
            for r in steps],
        "sync_total_s_mean": mean("sync/total_s"), "sync_GBps_mean": mean("sync/GBps"),
        "sync_bytes": steps[-1].get("sync/bytes"),
        "rollout_tokens_per_s_mean": mean("perf/rollout_tokens_per_s"),
        "pipeline_tokens_per_s_mean": mean("perf/tokens_per_s"),
        "train_step_s_mean": mean("train/step_s"),
        "prompt_length_mismatches": final.get("rollout/prompt_length_mismatches"),
        "token_conservation_errors": final.get("rollout/token_conservation_errors"),
        "image_errors": final.get("rollout/image_errors"),
        "mismatch_kl_on_policy_steps": on_policy, "mismatch_kl_all_steps": [r["train/mismatch_kl"] for r in steps],
        "staleness_max": final.get("staleness/max"), "ledger_balance": final.get("ledger/balance"),
        "reward_mean_per_step": [round(r["rollout/reward_mean"], 3) for r in steps],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--model", default="/tmp/qwen3-vl-2b-random")
    p.add_argument("--out", default="/tmp/vl_pipeline_gpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="trainer and engine dtype (float32: the trainer-vs-engine KL without bf16 rounding)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    model, out = Path(args.model), Path(args.out)
    build_s = build_model(model)
    res = run_pipeline(model, out, args.steps, args.dtype, args.lr, args.overrides)
    summary = summarise(res, build_s) | {"dtype": args.dtype} | vision_tower_trained(model, out, args.lr, args.steps)
    text = json.dumps(summary, indent=2)
    print(text)  # noqa: T201 - a benchmark prints its JSON
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"vl_pipeline_gpu_{args.dtype}.json").write_text(text)


if __name__ == "__main__":
    main()
