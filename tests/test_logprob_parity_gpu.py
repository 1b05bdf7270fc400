"""GPU: trainer (FSDP2, bf16 compute) vs vLLM (bf16) log-probs on identical weights.

Prints the mismatch; the bound is loose (bf16 kernels differ between HF and vLLM).
"""

import random
import socket

import pytest

from verl_async.algorithms.losses import k3
from verl_async.config.algorithm import AlgorithmConfig
from verl_async.config.model import ModelConfig
from verl_async.config.trainer import TrainerConfig
from verl_async.types import TrainBatch, TrainRow

pytestmark = pytest.mark.gpu


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_logprob_parity_bf16_gpu(tiny_path, tmp_path):
    import torch
    from vllm import LLM, SamplingParams

    from verl_async.training.worker import TrainerWorker

    worker = TrainerWorker(0, 1, tiny_path, ModelConfig(path=tiny_path, dtype="bfloat16"),
                           TrainerConfig(lr=1e-3, micro_batch_max_tokens=4096),
                           AlgorithmConfig(policy_loss="ppo", is_correction="none"), total_steps=4, device="cuda")
    worker.setup("127.0.0.1", free_port())
    try:
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(8, 64))] for _ in range(64)]
        warm = [TrainRow(p, [rng.randrange(3, 500) for _ in range(16)], [-6.9] * 16, [1] * 16,
                         rng.choice([-1.0, 1.0]), [0] * 16) for p in prompts[:16]]
        worker.train_step(TrainBatch(rows=warm, step=0, policy_version=0))
        worker.export_hf(str(tmp_path / "hf"))
        llm = LLM(model=str(tmp_path / "hf"), dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.3,
                  logprobs_mode="processed_logprobs", max_model_len=1024, seed=0)
        params = SamplingParams(temperature=1.0, max_tokens=256, logprobs=0, detokenize=False, ignore_eos=True)
        rows = []
        for out in llm.generate([{"prompt_token_ids": p} for p in prompts], params):
            c = out.outputs[0]
            ids = list(c.token_ids)
            rows.append(TrainRow(list(out.prompt_token_ids), ids, [c.logprobs[j][t].logprob for j, t in enumerate(ids)],
                                 [1] * len(ids), 0.0, [1] * len(ids)))
        trainer = worker.compute_logprobs(rows)
        engine = torch.tensor([x for r in rows for x in r.rollout_logprobs], dtype=torch.float64)
        mine = torch.tensor([x for lp in trainer for x in lp], dtype=torch.float64)
        kl = k3(mine - engine).mean().item()
        print(f"bf16 GPU: {engine.numel()} tokens, mismatch k3 KL {kl:.3e}, "
              f"mean |diff| {(mine - engine).abs().mean().item():.3e}, max |diff| {(mine - engine).abs().max().item():.3e}")
        assert kl < 1e-3  # issue 10: the trainer's varlen + chunked log-prob path must keep this
    finally:
        worker.shutdown()
