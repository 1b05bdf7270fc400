"""Two gloo trainer ranks (Ray actors, FSDP2 on CPU): save after a step, reload into fresh
workers, and the state, the next step's metrics and the weights after it are identical."""

import random

import pytest
import torch
from safetensors.torch import load_file

from verl_async.config.algorithm import AlgorithmConfig
from verl_async.config.model import ModelConfig
from verl_async.config.trainer import TrainerConfig
from verl_async.training.batching import make_micro_batches
from verl_async.training.group import TrainerGroup
from verl_async.training.model import load_hf_model, token_logprobs
from verl_async.types import TrainBatch, TrainRow


def rows_for(seed: int, n: int = 6) -> list[TrainRow]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p, r = rng.randint(3, 9), rng.randint(3, 9)
        rows.append(TrainRow(prompt_ids=[rng.randrange(3, 500) for _ in range(p)],
                             response_ids=[rng.randrange(3, 500) for _ in range(r)],
                             rollout_logprobs=[-6.0 - 0.1 * rng.random() for _ in range(r)], loss_mask=[1] * r,
                             advantage=rng.choice([-1.0, 1.0]), policy_versions=[0] * r))
    return rows


def make_group(tiny_path: str) -> TrainerGroup:
    trainer = TrainerConfig(num_workers=2, lr=1e-3, warmup_steps=1, lr_schedule="linear", micro_batch_max_tokens=40,
                            mini_batches=2)
    algo = AlgorithmConfig(policy_loss="decoupled_ppo", is_correction="tis")
    return TrainerGroup(tiny_path, ModelConfig(path=tiny_path), trainer, algo, total_steps=5, device="cpu")


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_checkpoint_roundtrip_two_ranks(tiny_path, ray_session, tmp_path):
    extra = {"data_position": 17, "queue": [{"prompt_id": "p3", "tokens": [1, 2, 3]}]}
    group = make_group(tiny_path)
    try:
        group.train_step(TrainBatch(rows=rows_for(0), step=0, policy_version=0))
        group.save_checkpoint(str(tmp_path / "ckpt"), extra)
        group.export_hf(str(tmp_path / "saved"))
        expected = group.train_step(TrainBatch(rows=rows_for(1), step=1, policy_version=1))
        group.export_hf(str(tmp_path / "after"))
    finally:
        group.shutdown()
    assert (tmp_path / "ckpt" / "trainer_state.pt").exists() and not (tmp_path / "ckpt.tmp").exists()

    fresh = make_group(tiny_path)
    try:
        assert fresh.state() == {"step": 0, "policy_version": 0}
        assert fresh.load_checkpoint(str(tmp_path / "ckpt")) == extra
        assert fresh.state() == {"step": 1, "policy_version": 1}
        fresh.export_hf(str(tmp_path / "loaded"))
        got = fresh.train_step(TrainBatch(rows=rows_for(1), step=1, policy_version=1))
        fresh.export_hf(str(tmp_path / "after_resume"))
        probe = rows_for(2, n=5)
        two_rank_logprobs = fresh.compute_logprobs(probe)  # each rank does its share, rank 0 returns all
    finally:
        fresh.shutdown()

    saved, loaded = weights(tmp_path / "saved"), weights(tmp_path / "loaded")
    assert saved.keys() == loaded.keys()
    for name in saved:
        assert torch.equal(saved[name], loaded[name]), name
    assert got.step == expected.step == 1
    for key in ("train/loss", "train/grad_norm", "train/lr", "train/mismatch_kl", "train/pg_clipfrac",
                "train/is_ratio_max", "train/entropy"):
        assert got.metrics[key] == pytest.approx(expected.metrics[key], rel=1e-6, abs=1e-9), key
    after, resumed = weights(tmp_path / "after"), weights(tmp_path / "after_resume")
    for name in after:  # identical optimizer moments and lr: the update after resuming is the same
        torch.testing.assert_close(resumed[name], after[name], rtol=0, atol=1e-6)

    reference = load_hf_model(str(tmp_path / "after_resume"), ModelConfig()).eval()
    for row, lps in zip(probe, two_rank_logprobs, strict=True):
        (mb,) = make_micro_batches([row], [0], 1000, pad_id=0)
        with torch.no_grad():
            expected_lp, _ = token_logprobs(reference, mb, temperature=1.0)
        assert lps == pytest.approx(expected_lp[0].tolist(), abs=1e-5)

    # the exported folder is a complete HF model with its tokenizer (vLLM loading it: test_logprob_parity)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for name, t in model.named_parameters():
        assert torch.equal(t.detach(), saved[name]), name
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").vocab_size > 0
