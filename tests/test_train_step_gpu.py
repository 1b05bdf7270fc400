"""GPU: the FSDP2 path in bf16 (nccl, activation checkpointing, DCP checkpoints) on up to 2 GPUs.

Run on a GPU machine: `python -m pytest -q -s tests/test_train_step_gpu.py tests/test_logprob_parity_gpu.py`.
"""

import random

import pytest
import torch
from safetensors.torch import load_file

from verl_async.config.algorithm import AlgorithmConfig
from verl_async.config.model import ModelConfig
from verl_async.config.trainer import TrainerConfig
from verl_async.types import TrainBatch, TrainRow

pytestmark = pytest.mark.gpu


def rows_for(seed: int, n: int = 16) -> list[TrainRow]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p, r = rng.randint(8, 32), rng.randint(8, 64)
        rows.append(TrainRow(prompt_ids=[rng.randrange(3, 500) for _ in range(p)],
                             response_ids=[rng.randrange(3, 500) for _ in range(r)],
                             rollout_logprobs=[-6.9] * r, loss_mask=[1] * r,
                             advantage=1.0 if i % 2 else -1.0, policy_versions=[0] * r))
    return rows


def make_group(tiny_path: str):
    from verl_async.training.group import TrainerGroup

    workers = min(2, torch.cuda.device_count())
    trainer = TrainerConfig(num_workers=workers, lr=1e-3, micro_batch_max_tokens=256, mini_batches=2)
    model = ModelConfig(path=tiny_path, dtype="bfloat16", gradient_checkpointing=True)
    return TrainerGroup(tiny_path, model, trainer, AlgorithmConfig(policy_loss="ppo", is_correction="none"),
                        total_steps=10, device="cuda")


def test_fsdp2_bf16_train_and_checkpoint(tiny_path, ray_session, tmp_path):
    group = make_group(tiny_path)
    try:
        group.export_hf(str(tmp_path / "before"))
        losses = [group.train_step(TrainBatch(rows_for(0), s, s)).metrics["train/loss"] for s in range(3)]
        group.export_hf(str(tmp_path / "after"))
        group.save_checkpoint(str(tmp_path / "ckpt"), {"pos": 3})
        expected = group.train_step(TrainBatch(rows_for(1), 3, 3)).metrics
    finally:
        group.shutdown()
    print("losses", losses)
    assert losses[-1] < losses[0]
    before, after = load_file(str(tmp_path / "before/model.safetensors")), load_file(str(tmp_path / "after/model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    assert not [n for n in before if torch.equal(before[n], after[n])]

    fresh = make_group(tiny_path)
    try:
        assert fresh.load_checkpoint(str(tmp_path / "ckpt")) == {"pos": 3}
        assert fresh.state() == {"step": 3, "policy_version": 3}
        got = fresh.train_step(TrainBatch(rows_for(1), 3, 3)).metrics
    finally:
        fresh.shutdown()
    print("next-step loss", expected["train/loss"], got["train/loss"])
    assert got["train/loss"] == pytest.approx(expected["train/loss"], rel=1e-3, abs=1e-5)
    assert got["train/lr"] == expected["train/lr"]


def test_varlen_kernel_matches_padded_sdpa_bf16(tiny_path):
    """torch's FlashAttention varlen kernel (packed rows) against causal sdpa on padded rows, on the
    GPU in bf16: same log-probs and gradients within bf16 rounding."""
    from verl_async.training.attention import VARLEN_IMPLEMENTATION, resolve_attention
    from verl_async.training.batching import make_micro_batches
    from verl_async.training.model import load_hf_model, token_logprobs

    device = torch.device("cuda")
    assert resolve_attention("auto", device, torch.bfloat16, vision=False) == "packed"
    rows = rows_for(2, n=24)
    results = {}
    for impl, padded in ((VARLEN_IMPLEMENTATION, False), ("sdpa", True)):
        model = load_hf_model(tiny_path, ModelConfig(path=tiny_path), impl).to(device, torch.bfloat16)
        logps = {}
        for mb in make_micro_batches(rows, list(range(len(rows))), 512, pad_id=0, padded=padded):
            mb = mb.to(device)
            lp, ent = token_logprobs(model, mb, temperature=1.0, entropy="grad")
            ((lp * mb.advantages[:, None] + 0.01 * ent) * mb.loss_mask).sum().backward()
            for j, i in enumerate(mb.row_ids):
                logps[i] = lp[j, : len(rows[i].response_ids)].detach().float().cpu()
        grads = torch.cat([p.grad.float().flatten().cpu() for p in model.parameters()])
        results[impl] = (torch.cat([logps[i] for i in range(len(rows))]), grads)
    (lp_a, g_a), (lp_b, g_b) = results.values()
    diff = (lp_a - lp_b).abs()
    rel = ((g_a - g_b).norm() / g_b.norm()).item()
    print(f"varlen vs padded bf16: max |dlogp| {diff.max():.3e}, mean {diff.mean():.3e}, grad rel diff {rel:.3e}")
    assert diff.mean() < 2e-2 and rel < 5e-2
