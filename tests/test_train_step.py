"""One in-process TrainerWorker (gloo, world size 1) on the tiny model: a step moves every
trainable parameter, the loss on a fixed batch goes down, the step counters behave."""

import math
import random
import socket

import pytest
import torch

from verl_async.config.algorithm import AlgorithmConfig
from verl_async.config.model import ModelConfig
from verl_async.config.trainer import TrainerConfig
from verl_async.training.worker import TrainerWorker
from verl_async.types import TrainBatch, TrainRow

REQUIRED = ("train/loss", "train/grad_norm", "train/lr", "train/entropy", "train/mismatch_kl", "train/pg_clipfrac",
            "train/is_ratio_mean", "train/is_ratio_max", "train/is_masked_frac", "train/tokens", "train/kl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_worker(tiny_path: str, algorithm: AlgorithmConfig, **trainer_kw) -> TrainerWorker:
    trainer = TrainerConfig(**({"lr": 1e-4, "micro_batch_max_tokens": 96, "mini_batches": 2} | trainer_kw))
    worker = TrainerWorker(0, 1, tiny_path, ModelConfig(path=tiny_path), trainer, algorithm, total_steps=10,
                           device="cpu")
    worker.setup("127.0.0.1", free_port())
    return worker


def random_rows(n: int, seed: int) -> list[TrainRow]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p, r = rng.randint(4, 10), rng.randint(4, 12)
        rows.append(TrainRow(prompt_ids=[rng.randrange(3, 500) for _ in range(p)],
                             response_ids=[rng.randrange(3, 500) for _ in range(r)],
                             rollout_logprobs=[0.0] * r, loss_mask=[1] * (r - 1) + [0],
                             advantage=1.0 if i % 2 == 0 else -1.0, policy_versions=[0] * r))
    return rows


def on_policy(worker: TrainerWorker, rows: list[TrainRow]) -> list[TrainRow]:
    """Rows whose behaviour log-probs are the worker's own (as if sampled from it)."""
    for row, lp in zip(rows, worker.compute_logprobs(rows), strict=True):
        row.rollout_logprobs = lp
    return rows


def snapshot(worker: TrainerWorker) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in worker.iter_sync_tensors()}


def test_step_updates_all_params_and_loss_goes_down(tiny_path):
    worker = make_worker(tiny_path, AlgorithmConfig(policy_loss="ppo", is_correction="none"))
    try:
        rows = on_policy(worker, random_rows(8, seed=0))
        before = snapshot(worker)
        assert len(before) == len(worker.tensor_metas()) > 0
        losses = []
        for step in range(4):
            m = worker.train_step(TrainBatch(rows=rows, step=step, policy_version=step)).metrics
            losses.append(m["train/loss"])
            if step == 0:
                after = snapshot(worker)
                unchanged = [n for n in before if torch.equal(before[n], after[n])]
                assert not unchanged, f"parameters not updated by one step: {unchanged}"
                for k in REQUIRED:
                    assert k in m and math.isfinite(m[k]), k
                assert m["train/mismatch_kl"] == pytest.approx(0.0, abs=1e-6)  # behaviour == trainer on step 0
                assert m["train/tokens"] == sum(len(r.prompt_ids) + len(r.response_ids) for r in rows)
        # plain PPO against fixed behaviour log-probs: the surrogate -A * ratio falls as the policy moves
        assert losses[-1] < losses[0] - 1e-3, losses
        assert worker.step == worker.policy_version == 4
        with pytest.raises(ValueError, match="batch.step=2"):
            worker.train_step(TrainBatch(rows=rows, step=2, policy_version=2))
    finally:
        worker.shutdown()


def test_decoupled_tis_kl_entropy_step(tiny_path):
    """Also the replicated (fsdp=False) path."""
    algo = AlgorithmConfig(policy_loss="decoupled_ppo", is_correction="tis", kl_coef=0.05, entropy_coef=0.01,
                           loss_agg="seq_mean")
    worker = make_worker(tiny_path, algo, ppo_epochs=2, warmup_steps=2, lr_schedule="cosine", fsdp=False)
    try:
        assert worker.ref_model is not None
        rows = on_policy(worker, random_rows(6, seed=1))
        stale = [lp - 0.3 if j % 3 == 0 else lp for j, lp in enumerate(rows[0].rollout_logprobs)]
        rows[0].rollout_logprobs = stale  # a few tokens look stale: w = e^0.3 there
        m = worker.train_step(TrainBatch(rows=rows, step=0, policy_version=0)).metrics
        assert m["train/lr"] == pytest.approx(1e-4 / 2)  # warm-up step 1 of 2
        assert m["train/is_ratio_max"] == pytest.approx(math.exp(0.3), rel=1e-4)
        assert 0 < m["train/mismatch_kl"] < 0.05
        assert m["train/kl"] >= 0 and m["train/entropy"] > 0
        m2 = worker.train_step(TrainBatch(rows=on_policy(worker, rows), step=1, policy_version=1)).metrics
        assert m2["train/lr"] == pytest.approx(1e-4)
        assert m2["train/kl"] > 0  # the policy has moved away from the reference
    finally:
        worker.shutdown()


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_proximal_pass_only_when_a_step_makes_several_updates(tiny_path, mini_batches):
    """decoupled_ppo with one update per step trains on the current log-probs as the proximal ones
    (no extra forward pass); with several updates the proximal log-probs come from a pass first."""
    algo = AlgorithmConfig(policy_loss="decoupled_ppo", is_correction="tis")
    worker = make_worker(tiny_path, algo, mini_batches=mini_batches, micro_batch_max_tokens=4096)
    try:
        rows = on_policy(worker, random_rows(6, seed=3))
        calls = []
        hook = worker.model.register_forward_pre_hook(lambda *_: calls.append(1))
        m = worker.train_step(TrainBatch(rows=rows, step=0, policy_version=0)).metrics
        hook.remove()
        updates = mini_batches  # one micro-batch per mini-batch at this budget
        assert len(calls) == updates + (updates if updates > 1 else 0)
        assert m["train/mismatch_kl"] == pytest.approx(0.0, abs=1e-6)
        assert m["train/is_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    finally:
        worker.shutdown()
