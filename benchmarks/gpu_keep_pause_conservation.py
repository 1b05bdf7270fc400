"""GPU evidence: keep-mode pause/resume loses no token and labels every token's policy_version exactly.

The check of tests/test_keep_pause_conserves_tokens.py on a GPU, through RolloutServer, with
vLLM's async scheduling at its GPU default (on), on counter models of Qwen3-0.6B shape built
from config (no download): greedy output is prev + STEP (mod 1024). Weights flip between the
STEP=1 and STEP=2 counters inside some pauses (new policy_version each time), so every token's
step says which weights produced it: a dropped, repeated or shifted token, or a token labelled
with the wrong version, shows as a wrong step at its position.

    python benchmarks/gpu_keep_pause_conservation.py [--requests 128] [--max-tokens 512] [--cycles 24]

Prints one JSON object; exit code 0 iff every check passed.
"""

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the JSON result

logger = logging.getLogger("gpu_keep_pause_conservation")
VOCAB = 1024  # verl_async.assets.build.VOCAB_SIZE
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def step_of(version: int) -> int:
    return 2 if version % 2 else 1


def build_counters(root: Path, device: str) -> dict[int, str]:
    """Two Qwen3-0.6B-shaped counters (STEP 1 and 2; vocab 1024, untied), bf16, same embeddings.
    On CPU (a smoke run of this script) a 2-layer, hidden-256 shape in float32."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from verl_async.assets.build import counter_weights, ensure_asset

    small = ensure_asset(str(root / "assets"), "counter", step=1)  # for its tokenizer and token ids
    ids = json.loads((small / "config.json").read_text())
    shape = (dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128) if device == "cuda" else
             dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = Qwen3Config(
        vocab_size=VOCAB, max_position_embeddings=4096, rope_theta=1_000_000.0, tie_word_embeddings=False,
        bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
        **shape)  # the saved config takes its dtype from the model's weights
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    paths = {}
    for step in (1, 2):
        counter_weights(model, step, seed=0)
        out = root / f"counter-{shape['num_hidden_layers']}L-step{step}"
        model.to(dtype).save_pretrained(out, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (small / name).exists():
                shutil.copy(small / name, out / name)
        paths[step] = str(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return paths


def bad_steps(gen) -> list[int]:
    prev, bad = gen.prompt_ids[-1], []
    for i, (tok, ver) in enumerate(zip(gen.response_ids, gen.policy_versions, strict=True)):
        if tok != (prev + step_of(ver)) % VOCAB:
            bad.append(i)
        prev = tok
    return bad


async def run(args, paths: dict[int, str]) -> dict:
    import vllm

    from verl_async.config import ModelConfig, RolloutConfig, SyncConfig
    from verl_async.rollout.server import RolloutServer
    from verl_async.types import EnginePrompt, FinishReason

    cpu = args.device == "cpu"
    rollout = RolloutConfig(max_model_len="1024", max_num_seqs=max(256, args.requests + 16),
                            gpu_memory_utilization=args.gpu_memory_utilization,
                            kv_cache_memory_bytes=(256 << 20) if cpu else 0,
                            response_length=args.max_tokens, temperature=0.0)
    model = ModelConfig(path=paths[1], dtype="float32" if cpu else "bfloat16")
    server = RolloutServer(0, paths[1], model, rollout, SyncConfig(), args.device)
    t0 = time.monotonic()
    info = await server.start()
    start_s = time.monotonic() - t0
    async_scheduling = bool(server._engine.vllm_config.scheduler_config.async_scheduling)
    greedy = {"temperature": 0.0, "ignore_eos": True}
    rng = random.Random(args.seed)

    # warm-up (compiles / captures graphs), then the measured run
    await asyncio.gather(*(server.generate(f"warm-{i}", EnginePrompt([i + 1]), 16, greedy) for i in range(8)))
    before = await server.stats()
    version = int(before["rollout/policy_version"])
    t0 = time.monotonic()
    tasks = [asyncio.create_task(server.generate(
        f"keep-{i}", EnginePrompt([rng.randrange(VOCAB) for _ in range(rng.randint(1, 64))]), args.max_tokens, greedy))
        for i in range(args.requests)]
    late, cycles, flips, pause_s, reload_s, running_at_pause = [], 0, 0, [], [], []
    while cycles < args.cycles:
        await asyncio.sleep(rng.uniform(0.0, 2 * args.mean_gap_s))
        t = time.monotonic()
        await server.pause("keep", True)
        pause_s.append(time.monotonic() - t)
        stats = await server.stats()
        if stats["rollout/outstanding"] == 0:
            await server.resume()
            break
        cycles += 1
        running_at_pause.append(stats["rollout/num_running"])
        if rng.random() < 0.5:
            version += 1
            flips += 1
            t = time.monotonic()
            await server.reload_weights(paths[step_of(version)], version)
            reload_s.append(time.monotonic() - t)
            if len(late) < 8:  # submitted while paused, after the update: never an older version
                late.append((version, asyncio.create_task(server.generate(
                    f"late-{version}", EnginePrompt([rng.randrange(VOCAB)]), args.max_tokens, greedy))))
                await asyncio.sleep(0.01)  # let it reach the paused engine
        await server.resume()
    gens = await asyncio.gather(*tasks)
    late_gens = [(v, await task) for v, task in late]
    elapsed = time.monotonic() - t0
    after = await server.stats()
    await server.shutdown()

    everything = gens + [g for _, g in late_gens]
    wrong = {g.request_id: bad_steps(g)[:5] for g in everything if bad_steps(g)}
    length_errors = [g.request_id for g in everything
                     if g.finish_reason != FinishReason.LENGTH or len(g.response_ids) != args.max_tokens
                     or not len(g.logprobs) == len(g.policy_versions) == len(g.response_ids)]
    order_errors = [g.request_id for g in everything if g.policy_versions != sorted(g.policy_versions)]
    late_errors = [g.request_id for v, g in late_gens if g.policy_versions[0] < v]
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    checks = {
        "cycles_hit_running_requests": cycles >= min(args.cycles, 20),
        "weight_flips": flips >= 3,
        "no_wrong_steps": not wrong,
        "every_output_exactly_max_tokens": not length_errors,
        "versions_non_decreasing": not order_errors,
        "late_requests_new_version": not late_errors,
        "token_conservation_errors_zero": after["rollout/token_conservation_errors"] == 0,
        "version_attribution_errors_zero": after["rollout/version_attribution_errors"] == 0,
        "sync_resets_reported": delta["rollout/preemptions_from_sync"] > 0,
    }
    if not cpu:
        checks["async_scheduling_on"] = async_scheduling  # the setting under which vLLM #42043 showed
    return {
        "ok": all(checks.values()), "checks": checks,
        "vllm_version": vllm.__version__, "python": sys.version.split()[0],
        "gpu": _gpu_name(), "async_scheduling": async_scheduling, "server_info": info.__dict__,
        "requests": args.requests, "late_requests": len(late_gens), "max_tokens": args.max_tokens,
        "pause_cycles_in_flight": cycles, "weight_flips": flips,
        "mean_running_at_pause": sum(running_at_pause) / max(1, len(running_at_pause)),
        "pause_call_s_mean": sum(pause_s) / max(1, len(pause_s)),
        "reload_weights_s_mean": sum(reload_s) / max(1, len(reload_s)),
        "engine_start_s": start_s, "elapsed_s": elapsed,
        "generated_tokens": sum(len(g.response_ids) for g in everything),
        "tokens_per_s": sum(len(g.response_ids) for g in everything) / elapsed,
        "wrong_steps": dict(list(wrong.items())[:10]), "length_errors": length_errors[:10],
        "version_order_errors": order_errors[:10], "late_version_errors": late_errors,
        "stats_delta": {k: v for k, v in delta.items() if v},
    }


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--cycles", type=int, default=24, help="keep-mode pause/resume cycles while requests run")
    parser.add_argument("--mean-gap-s", type=float, default=0.15, help="mean generation time between pauses")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="", help="where the models are built (default: a temp folder)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a small smoke run")
    args = parser.parse_args()
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"))
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="keep_pause_"))
    paths = build_counters(root, args.device)
    result = asyncio.run(run(args, paths))
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
