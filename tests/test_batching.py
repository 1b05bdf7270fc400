"""Micro-batch packing: budgets, rank shares, and that packed / padded layouts give the same
log-probs as running each row alone through the HF model."""

import random

import pytest
import torch

from verl_async.config.model import ModelConfig
from verl_async.training.batching import (
    dummy_micro_batch,
    make_micro_batches,
    plan_micro_batches,
    row_length,
    shard_rows,
    split_mini_batches,
)
from verl_async.training.model import load_hf_model, token_logprobs
from verl_async.types import TrainRow


def make_rows(n: int, seed: int = 0, vocab: int = 500) -> list[TrainRow]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p, r = rng.randint(1, 12), rng.randint(0, 10)
        rows.append(TrainRow(prompt_ids=[rng.randrange(3, vocab) for _ in range(p)],
                             response_ids=[rng.randrange(3, vocab) for _ in range(r)],
                             rollout_logprobs=[-1.0] * r, loss_mask=[1] * r, advantage=rng.uniform(-1, 1),
                             policy_versions=[0] * r))
    return rows


def test_plan_respects_budget_and_covers_rows():
    rows = make_rows(40)
    lengths = [row_length(r) for r in rows]
    for padded in (False, True):
        plan = plan_micro_batches(list(range(40)), lengths, 30, padded)
        assert sorted(i for b in plan for i in b) == list(range(40))
        for b in plan:
            cost = len(b) * max(lengths[i] for i in b) if padded else sum(lengths[i] for i in b)
            assert cost <= 30 or len(b) == 1


def test_row_over_budget_gets_own_micro_batch(caplog):
    rows = make_rows(3)
    rows[1] = TrainRow([5] * 50, [6] * 10, [-1.0] * 10, [1] * 10, 1.0, [0] * 10)
    mbs = make_micro_batches(rows, [0, 1, 2], 40, pad_id=0)
    assert any(mb.row_ids == [1] for mb in mbs)
    assert "exceeds trainer.micro_batch_max_tokens" in caplog.text


def test_shards_are_balanced_and_deterministic():
    rows = make_rows(33)
    lengths = [row_length(r) for r in rows]
    shards = shard_rows(list(range(33)), lengths, 4)
    assert shards == shard_rows(list(range(33)), lengths, 4)
    assert sorted(i for s in shards for i in s) == list(range(33))
    loads = [sum(lengths[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(lengths)


def test_split_mini_batches():
    assert split_mini_batches(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert split_mini_batches(2, 1) == [[0, 1]]


def test_micro_batch_layout_indices():
    rows = [TrainRow([1, 2, 3], [4, 5], [-0.1, -0.2], [1, 0], 0.5, [0, 0]),
            TrainRow([6], [7, 8, 9], [-0.3, -0.4, -0.5], [1, 1, 1], -1.0, [0, 0, 0])]
    (mb,) = make_micro_batches(rows, [0, 1], 100, pad_id=0)
    assert mb.packed and mb.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert mb.logits_index.tolist() == [2, 3, 5, 6, 7]  # the position before each response token
    assert mb.targets.tolist() == [4, 5, 7, 8, 9]
    assert mb.response_mask.tolist() == [[True, True, False], [True, True, True]]
    assert mb.loss_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    (pd,) = make_micro_batches(rows, [0, 1], 100, pad_id=0, padded=True)
    assert pd.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert pd.logits_index.tolist() == [2, 3, 5, 6, 7]
    assert dummy_micro_batch(0).row_ids == []


@pytest.fixture(scope="module")
def tiny_model(tiny_path):
    return load_hf_model(tiny_path, ModelConfig(path=tiny_path)).eval()


@torch.no_grad()
def test_packed_and_padded_match_single_rows(tiny_model):
    rows = make_rows(12, seed=1)
    reference = []
    for r in rows:  # each row alone, no packing
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        logp = torch.log_softmax(tiny_model(input_ids=ids, use_cache=False).logits[0].float(), -1)
        p = len(r.prompt_ids)
        reference.append([logp[p - 1 + j, tok].item() for j, tok in enumerate(r.response_ids)])
    for padded in (False, True):
        got: dict[int, list[float]] = {}
        mbs = make_micro_batches(rows, list(range(12)), 48, pad_id=0, padded=padded)
        assert len(mbs) > 1
        for mb in mbs:
            lp, ent = token_logprobs(tiny_model, mb, temperature=1.0, entropy="no_grad")
            assert (ent[mb.response_mask] > 0).all()
            for j, i in enumerate(mb.row_ids):
                got[i] = lp[j, : len(rows[i].response_ids)].tolist()
        for i in range(12):
            assert got[i] == pytest.approx(reference[i], abs=2e-5), (padded, i)


def test_bad_rows_are_rejected_with_the_row_index():
    good = TrainRow([1, 2], [3], [-0.1], [1], 0.0, [0])
    with pytest.raises(ValueError, match="TrainRow 1 has an empty prompt"):
        make_micro_batches([good, TrainRow([], [3], [-0.1], [1], 0.0, [0])], [0, 1], 100, pad_id=0)
    with pytest.raises(ValueError, match="TrainRow 0: response_ids, rollout_logprobs and loss_mask"):
        make_micro_batches([TrainRow([1], [3, 4], [-0.1], [1, 1], 0.0, [0, 0])], [0], 100, pad_id=0)
