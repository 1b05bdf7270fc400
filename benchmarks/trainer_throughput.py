"""Trainer throughput: the verl_async trainer vs a plain Hugging Face training loop, same batch.

For each model shape and response-length distribution, one batch of rows (prompt + sampled
response, advantages, behaviour log-probs) is trained on twice, from the same random weights:
- verl_async: a TrainerWorker (FSDP2, bf16 compute, decoupled PPO, trainer.attention=auto,
  chunked log-probs, micro-batches under a token budget);
- plain HF: AutoModelForCausalLM under bf16 autocast, 8 rows per micro-batch in arrival order,
  right-padded, causal sdpa with no mask, full fp32 logits + log_softmax, a policy-gradient
  loss, AdamW.
Both use the same gradient checkpointing setting. Reported per run: tokens/s (real tokens:
prompt + response, padding excluded), MFU, peak memory, and before training, the two
implementations' log-probs on the same rows (the attention and log-prob paths must agree).

MFU = model FLOPs / (step time * peak), model FLOPs = 3 x forward, forward = 2 x matmul
parameters x tokens (the output layer only where a log-prob is needed: response tokens)
+ causal attention 2 x layers x heads x head_dim x sum(len^2). Activation recomputation is not
counted (it is model FLOPs, not hardware FLOPs). Peak: 989 TFLOP/s, the H100/H200 SXM dense
bf16 datasheet figure (about 790 was measured for a large bf16 matmul on the lent H200).

    python3 benchmarks/trainer_throughput.py --shapes 0.6B,1.7B,4B --lengths fixed,longtail
    python3 benchmarks/trainer_throughput.py --device cpu --shapes tiny --rows 8   # smoke run

Prints one JSON object per run and a summary table; writes $OUT/trainer_throughput.json when $OUT is set.
"""

import argparse
import gc
import json
import logging
import math
import os
import random
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_TFLOPS = 989.0
HF_ROWS_PER_MICRO_BATCH = 8
log = logging.getLogger("trainer_throughput")


def make_rows(n: int, lengths: str, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    """fixed: every response response_len tokens; longtail: Pareto(1.2) x 64, capped at 4096."""
    from verl_async.types import TrainRow

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        r = response_len if lengths == "fixed" else min(4096, int(64 * rng.paretovariate(1.2)))
        rows.append(TrainRow(prompt_ids=[rng.randrange(3, vocab) for _ in range(prompt_len)],
                             response_ids=[rng.randrange(3, vocab) for _ in range(r)],
                             rollout_logprobs=[-rng.uniform(5, 15) for _ in range(r)], loss_mask=[1] * r,
                             advantage=1.0 if i % 2 else -1.0, policy_versions=[0] * r))
    return rows


def model_flops(hf_config, rows) -> float:
    """Training FLOPs of one pass over `rows` (see the module docstring)."""
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attn = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    per_token = 2 * c.num_hidden_layers * (attn + mlp)
    tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in rows)
    responses = sum(len(r.response_ids) for r in rows)
    sq = sum((len(r.prompt_ids) + len(r.response_ids)) ** 2 for r in rows)
    forward = (per_token * tokens + 2 * c.hidden_size * c.vocab_size * responses
               + 2 * c.num_hidden_layers * c.num_attention_heads * head_dim * sq)
    return 3.0 * forward


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_memory(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def run_verl(path: str, rows, args, probe_rows) -> dict:
    """The verl_async trainer: warm-up steps, then timed steps; log-probs of probe_rows first."""
    from verl_async.config.algorithm import AlgorithmConfig
    from verl_async.config.model import ModelConfig
    from verl_async.config.trainer import TrainerConfig
    from verl_async.training.worker import TrainerWorker
    from verl_async.types import TrainBatch

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    worker = TrainerWorker(0, 1, path, ModelConfig(path=path, dtype=dtype, gradient_checkpointing=args.checkpointing),
                           TrainerConfig(lr=1e-6, micro_batch_max_tokens=args.micro_batch_tokens,
                                         fsdp=args.device == "cuda", attention=args.attention,
                                         fused_norms=bool(args.fused_norms), fused_optimizer=bool(args.fused_optimizer),
                                         compile_layers=bool(args.compile_layers)),
                           AlgorithmConfig(policy_loss="decoupled_ppo", is_correction="tis"),
                           total_steps=args.warmup + args.steps + int(args.profile), device=args.device)
    reset_memory(args.device)
    worker.setup("127.0.0.1", free_port())
    try:
        probe = worker.compute_logprobs(probe_rows)
        times = []
        for step in range(args.warmup + args.steps):
            sync(args.device)
            t0 = time.perf_counter()
            m = worker.train_step(TrainBatch(rows=rows, step=step, policy_version=step)).metrics
            sync(args.device)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
            log.info("verl_async step %d: %.2f s, loss %.4f", step, time.perf_counter() - t0, m["train/loss"])
        result = {"step_s": times, "peak_gb": peak_gb(args.device), "layout": worker.layout, "probe": probe,
                  "loss": m["train/loss"]}
        if args.profile:  # one more step, under the profiler (its wall time is not a timed step)
            from step_profile import profiled, summarise

            with profiled() as prof:
                sync(args.device)
                t0 = time.perf_counter()
                worker.train_step(TrainBatch(rows=rows, step=len(times) + args.warmup, policy_version=0))
                sync(args.device)
            result["profile"] = summarise(prof, time.perf_counter() - t0)
        return result
    finally:
        worker.shutdown()
        del worker
        reset_memory(args.device)


def run_hf(path: str, rows, args, probe_rows) -> dict:
    """The plain loop (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    reset_memory(args.device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").to(device)
    model.config.use_cache = False
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    cast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda")

    def micro_batch(chunk):
        seqs = [r.prompt_ids + r.response_ids for r in chunk]
        ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
        return ids.to(device)

    def response_logprobs(chunk, logits):
        logp = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for b, r in enumerate(chunk):
            p, n = len(r.prompt_ids), len(r.response_ids)
            tgt = torch.tensor(r.response_ids, device=device)
            out.append(logp[b, p - 1: p - 1 + n].gather(-1, tgt[:, None]).squeeze(-1))
        return out

    with torch.no_grad(), cast:
        model.eval()
        probe = [lp.tolist() for lp in response_logprobs(probe_rows, model(input_ids=micro_batch(probe_rows)).logits)]
    model.train()
    n_tokens = sum(len(r.response_ids) for r in rows)
    times = []
    for step in range(args.warmup + args.steps):
        sync(args.device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for i in range(0, len(rows), HF_ROWS_PER_MICRO_BATCH):
            chunk = rows[i: i + HF_ROWS_PER_MICRO_BATCH]
            with cast:
                logits = model(input_ids=micro_batch(chunk)).logits
            lps = response_logprobs(chunk, logits)
            loss = -sum((r.advantage * lp).sum() for r, lp in zip(chunk, lps, strict=True)) / n_tokens
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        log.info("plain HF step %d: %.2f s", step, time.perf_counter() - t0)
    result = {"step_s": times, "peak_gb": peak_gb(args.device), "probe": probe}
    del model, optimizer
    reset_memory(args.device)
    return result


def compare_probe(a: list[list[float]], b: list[list[float]]) -> dict:
    import torch

    x = torch.tensor([v for row in a for v in row], dtype=torch.float64)
    y = torch.tensor([v for row in b for v in row], dtype=torch.float64)
    d = x - y
    return {"tokens": int(d.numel()), "mean_abs_diff": d.abs().mean().item(), "max_abs_diff": d.abs().max().item(),
            "k3_kl": (torch.exp(d) - 1 - d).mean().item()}


def summarise(kind: str, res: dict, rows, flops: float) -> dict:
    step = sorted(res["step_s"])[len(res["step_s"]) // 2]  # median
    tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in rows)
    return {"impl": kind, "step_s": step, "tokens_per_s": tokens / step, "mfu": flops / step / (PEAK_TFLOPS * 1e12),
            "peak_gb": res["peak_gb"], "step_s_all": res["step_s"]}


def run_case(shape: str, lengths: str, args) -> dict:
    from transformers import AutoConfig

    path = model_path(shape, args)
    config = AutoConfig.from_pretrained(path)
    rows = make_rows(args.rows, lengths, args.prompt_len, args.response_len, min(config.vocab_size, 960))
    probe_rows = rows[:4]
    flops = model_flops(config, rows)
    out = {"shape": shape, "lengths": lengths, "rows": len(rows), "checkpointing": args.checkpointing,
           "fused_norms": args.fused_norms, "fused_optimizer": args.fused_optimizer,
           "compile_layers": args.compile_layers, "micro_batch_tokens": args.micro_batch_tokens,
           "tokens": sum(len(r.prompt_ids) + len(r.response_ids) for r in rows),
           "response_tokens": sum(len(r.response_ids) for r in rows),
           "longest": max(len(r.prompt_ids) + len(r.response_ids) for r in rows), "model_tflop": flops / 1e12,
           "peak_tflops": PEAK_TFLOPS, "device": args.device}
    results = {}
    impls = [("verl_async", run_verl)] + ([] if args.skip_hf else [("plain_hf", run_hf)])
    for kind, fn in impls:
        try:
            results[kind] = fn(path, rows, args, probe_rows)
            out[kind] = summarise(kind, results[kind], rows, flops)
        except Exception as e:  # an OOM in one implementation must not hide the other's numbers
            log.exception("%s failed on %s/%s", kind, shape, lengths)
            out[kind] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            reset_memory(args.device)
    if "verl_async" in results:
        out["verl_async"]["layout"] = results["verl_async"]["layout"]
        if "profile" in results["verl_async"]:
            out["verl_async"]["profile"] = results["verl_async"]["profile"]
    if len(results) == 2:
        out["speedup"] = out["verl_async"]["tokens_per_s"] / out["plain_hf"]["tokens_per_s"]
        out["logprob_agreement"] = compare_probe(results["verl_async"]["probe"], results["plain_hf"]["probe"])
    return out


def model_path(shape: str, args) -> str:
    if shape == "tiny":
        from verl_async.assets.build import ensure_asset

        return str(ensure_asset(os.path.expanduser("~/.cache/verl_async/assets"), "tiny"))
    from build_gpu_model import build

    out = Path(args.model_dir) / f"qwen3-{shape}"
    if not (out / "config.json").exists():
        t0 = time.perf_counter()
        build(shape, str(out))
        log.info("built %s in %.1f s", out, time.perf_counter() - t0)
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="0.6B,1.7B,4B")
    p.add_argument("--lengths", default="fixed,longtail")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--response-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--attention", default="auto", choices=["auto", "packed", "padded"])
    p.add_argument("--checkpointing", type=int, default=1, help="gradient checkpointing, both implementations")
    p.add_argument("--fused-norms", type=int, default=1, help="verl_async: trainer.fused_norms")
    p.add_argument("--fused-optimizer", type=int, default=1, help="verl_async: trainer.fused_optimizer")
    p.add_argument("--compile-layers", type=int, default=0, help="verl_async: trainer.compile_layers")
    p.add_argument("--profile", action="store_true", help="verl_async: one extra step under torch.profiler, "
                   "summarised in the JSON (benchmarks/step_profile.py)")
    p.add_argument("--skip-hf", action="store_true", help="only the verl_async trainer")
    p.add_argument("--tag", default="", help="suffix of the $OUT result file")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model-dir", default="/tmp/verl_async_bench_models")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    results = []
    for shape in args.shapes.split(","):
        for lengths in args.lengths.split(","):
            res = run_case(shape, lengths, args)
            results.append(res)
            print(json.dumps(res), flush=True)
            if os.environ.get("OUT"):
                Path(os.environ["OUT"], f"trainer_throughput{args.tag}.json").write_text(json.dumps(results, indent=1))
    print("shape lengths ckpt | verl tok/s MFU peakGB | plain tok/s MFU peakGB | speedup | logprob KL", flush=True)
    for r in results:
        v, h = r.get("verl_async", {}), r.get("plain_hf", {})

        def cols(x):
            return (f"{x['tokens_per_s']:.0f} {100 * x['mfu']:.1f}% {x['peak_gb']:.1f}" if "tokens_per_s" in x
                    else x.get("error", "?")[:40])

        kl = r.get("logprob_agreement", {}).get("k3_kl", math.nan)
        print(f"{r['shape']} {r['lengths']} {r['checkpointing']} fused={r['fused_norms']} | {cols(v)} | {cols(h)} | "
              f"{r.get('speedup', math.nan):.2f}x | {kl:.2e}", flush=True)


if __name__ == "__main__":
    main()
