"""GPU evidence for issue 4: full weight-sync cycles (pause -> transfer -> resume) through
verl_async.sync, from a trainer on GPU 0 into a running vLLM engine on GPU 1, over vLLM's NCCL
engine (packed buckets). Prints one JSON object per model shape and a summary.

Models are Qwen3-0.6B- and Qwen3-8B-shaped (untied, bf16), built from a config with random
weights and turned into a "counter" (greedy next token = previous + STEP; decoder layers are
identities), so a sync is checked by its effect: requests in flight at STEP=1 must continue at
STEP=3 after the sync, every one of them, with no token lost. Nothing is downloaded: the engine
starts from a config folder with vLLM's dummy weights, the handshake sync loads the trainer's.

One process holds the trainer (cuda:0) and the coordinator; the engine's own processes run on
GPU 1 with both GPUs visible (CUDA_VISIBLE_DEVICES=1,0 for them), so NCCL can use NVLink.

    python3 benchmarks/weight_sync_gpu.py [--shapes 0.6B,8B] [--rounds 5] [--requests 64] [--tokens 1024]
"""

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from verl_async.assets.build import counter_weights  # noqa: E402
from verl_async.config.sync import SyncConfig  # noqa: E402
from verl_async.sync.coordinator import WeightSyncCoordinator  # noqa: E402
from verl_async.sync.engine_side import weight_transfer_kwargs  # noqa: E402
from verl_async.sync.names import select_weights, sync_tensor_metas  # noqa: E402
from verl_async.sync.trainer_side import WeightSender  # noqa: E402

logger = logging.getLogger("weight_sync_gpu")

VOCAB = 151936
SHAPES = {  # Qwen3 sizes, untied (the counter needs its own output layer)
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16),
    "8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32),
}
TARGET_8B_TOTAL_S = 0.150


def qwen3_config(shape: str):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=VOCAB, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"],
                       dtype="bfloat16", **SHAPES[shape])


class Trainer:
    """Trainer rank 0 stand-in on cuda:0: a bf16 transformers model and a WeightSender."""

    def __init__(self, shape: str, seed: int = 0):
        from transformers import Qwen3ForCausalLM

        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda:0"):
                self.model = Qwen3ForCausalLM(qwen3_config(shape)).eval()
        finally:
            torch.set_default_dtype(torch.float32)
        counter_weights(self.model, 1, seed)
        self.sender: WeightSender | None = None

    def set_step(self, step: int) -> None:
        """Counter STEP (lm_head row j = embedding row j - step), on the GPU."""
        with torch.no_grad():
            emb = self.model.model.embed_tokens.weight
            self.model.lm_head.weight.copy_(torch.roll(emb, shifts=step, dims=0))
        torch.cuda.synchronize()

    # the API the coordinator drives (same as the real TrainerWorker's)
    def rendezvous_address(self):
        from verl_async.sync.coordinator import rendezvous_address

        return rendezvous_address()

    def init_weight_sender(self, backend, master_address, master_port, world_size, timeout_s):
        self.sender = WeightSender(backend, master_address, master_port, world_size, timeout_s)

    def tensor_metas(self):
        return sync_tensor_metas(self.model.named_parameters(), tied=False)

    def send_weights(self, bucket_bytes: int) -> dict:
        with torch.no_grad():
            named = ((n, t.detach()) for n, t in select_weights(self.model.named_parameters(), tied=False))
            return self.sender.send(named, bucket_bytes)

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        del self.model
        torch.cuda.empty_cache()


class Engine:
    """A RolloutServer-shaped wrapper of one AsyncLLM (the weight API plus token-in generation)."""

    def __init__(self, shape: str, sync: SyncConfig, max_num_seqs: int):
        self.folder = tempfile.mkdtemp(prefix=f"qwen3-{shape}-")
        qwen3_config(shape).save_pretrained(self.folder)
        self.sync, self.max_num_seqs = sync, max_num_seqs
        self.llm = None

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=self.folder, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                               max_model_len=4096, gpu_memory_utilization=0.85, max_num_seqs=self.max_num_seqs,
                               logprobs_mode="processed_logprobs", seed=0,
                               **weight_transfer_kwargs(self.sync, "cuda"))
        self.llm = AsyncLLM.from_engine_args(args)

    async def init_weight_transfer(self, init_info: dict) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        await self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    async def start_weight_update(self) -> None:
        await self.llm.start_weight_update()

    async def update_weights(self, update_info: dict) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        await self.llm.update_weights(WeightTransferUpdateRequest(update_info=update_info))

    async def finish_weight_update(self, policy_version: int) -> None:
        await self.llm.finish_weight_update()

    async def pause(self, mode: str = "keep", clear_cache: bool = True) -> None:
        await self.llm.pause_generation(mode=mode, clear_cache=clear_cache)

    async def resume(self) -> None:
        await self.llm.resume_generation()

    async def generate(self, request_id: str, prompt: list[int], n: int) -> list[int]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for out in self.llm.generate({"prompt_token_ids": prompt}, params, request_id):
            final = out
        return list(final.outputs[0].token_ids)

    def shutdown(self) -> None:
        self.llm.shutdown()


def steps_of(prompt: list[int], tokens: list[int]) -> list[int]:
    prev = [prompt[-1]] + tokens[:-1]
    return [(t - p) % VOCAB for p, t in zip(prev, tokens, strict=True)]


def switch_ok(prompt, tokens, n, before, after) -> bool:
    """All `before` steps, then all `after` steps, both parts non-empty, n tokens in all."""
    steps = steps_of(prompt, tokens)
    k = steps.index(after) if after in steps else n
    return len(tokens) == n and 0 < k < n and steps == [before] * k + [after] * (n - k)


async def sync_with_requests(engine: Engine, coord: WeightSyncCoordinator, trainer: Trainer, version: int,
                             before: int, after: int, requests: int, tokens: int, warm_s: float):
    """Start `requests` greedy requests at STEP=before, sync to STEP=after mid-flight, check them."""
    prompts = [[(1000 + 37 * i) % VOCAB, (1001 + 37 * i) % VOCAB] for i in range(requests)]
    tasks = [asyncio.ensure_future(engine.generate(f"v{version}-{i}", p, tokens)) for i, p in enumerate(prompts)]
    await asyncio.sleep(warm_s)
    trainer.set_step(after)
    metrics = await coord.sync(policy_version=version)
    outs = await asyncio.gather(*tasks)
    ok = sum(switch_ok(p, o, tokens, before, after) for p, o in zip(prompts, outs, strict=True))
    return metrics, ok


async def run_shape(shape: str, args) -> dict:
    sync = SyncConfig(bucket_bytes=args.bucket_mib << 20, timeout_s=300.0, clear_cache=not args.keep_cache)
    t0 = time.perf_counter()
    trainer = Trainer(shape)  # cuda:0 is initialised here, before the engine's processes see 1,0
    build_s = time.perf_counter() - t0
    os.environ["CUDA_VISIBLE_DEVICES"] = "1,0"  # the engine's processes: GPU 1 first, GPU 0 visible for NVLink
    engine = Engine(shape, sync, max_num_seqs=max(args.requests, 8))
    t0 = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - t0
    coord = WeightSyncCoordinator([engine], trainer, sync, device="cuda")
    try:
        handshake = await coord.setup(policy_version=0)  # dummy weights -> the trainer's STEP=1 counter
        probe = await engine.generate("probe", [5, 6], 8)
        assert steps_of([5, 6], probe) == [1] * 8, f"after the handshake the engine is not a +1 counter: {probe}"
        rounds, checks = [], []
        step = 1
        for r in range(args.rounds):
            new = 3 if step == 1 else 1
            metrics, ok = await sync_with_requests(engine, coord, trainer, r + 1, step, new, args.requests,
                                                   args.tokens, args.warm_s)
            rounds.append(metrics)
            checks.append(ok)
            step = new
        keys = sorted(rounds[0])
        result = {
            "shape": shape, "bytes": handshake["sync/bytes"], "bucket_bytes": sync.bucket_bytes,
            "clear_cache": sync.clear_cache, "trainer_build_s": build_s, "engine_start_s": start_s,
            "handshake": handshake, "rounds": rounds,
            "median": {k: statistics.median(m[k] for m in rounds) for k in keys},
            "requests_switched_cleanly": checks, "requests_per_round": args.requests,
            "tokens_per_request": args.tokens,
        }
    finally:
        engine.shutdown()
        trainer.close()
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="0.6B,8B")
    parser.add_argument("--rounds", type=int, default=5, help="timed syncs per shape, each with requests in flight")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--warm-s", type=float, default=0.5, help="seconds of decoding before each sync")
    parser.add_argument("--bucket-mib", type=int, default=1024)
    parser.add_argument("--keep-cache", action="store_true", help="pause with clear_cache=False")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 GPUs, sees {torch.cuda.device_count()}: run on nvidia-h200-x2")
    results = []
    for shape in args.shapes.split(","):
        result = asyncio.run(run_shape(shape, args))
        print(json.dumps(result), flush=True)
        results.append(result)
    summary = {r["shape"]: {k: round(r["median"][k], 4) for k in (
        "sync/pause_s", "sync/start_s", "sync/transfer_s", "sync/finish_s", "sync/resume_s", "sync/total_s",
        "sync/gather_s", "sync/GBps")} | {"GB": round(r["bytes"] / 1e9, 2),
                                          "all_requests_switched": all(c == r["requests_per_round"]
                                                                       for c in r["requests_switched_cleanly"])}
        for r in results}
    if "8B" in summary:
        summary["8B"]["target_total_s"] = TARGET_8B_TOTAL_S
        summary["8B"]["target_met"] = summary["8B"]["sync/total_s"] <= TARGET_8B_TOTAL_S
    print(json.dumps({"summary": summary}), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "weight_sync_gpu.json"), "w") as f:
            json.dump({"results": results, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
