"""Micro-batch packing: budgets, rank shares, and that every attention path (packed rows through
the varlen attention or through transformers' sdpa with a block mask, padded rows through
causal sdpa) gives the same log-probs and gradients as running each row alone (fp32: 2e-5)."""

import random

import pytest
import torch

from verl_async.config.model import ModelConfig
from verl_async.training.attention import VARLEN_IMPLEMENTATION
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
def tiny_models(tiny_path):
    """The same tiny model loaded with each attention implementation the trainer uses."""
    return {impl: load_hf_model(tiny_path, ModelConfig(path=tiny_path), impl).eval()
            for impl in ("sdpa", VARLEN_IMPLEMENTATION)}


PATHS = [("sdpa", True), (VARLEN_IMPLEMENTATION, False), ("sdpa", False)]
"""(attention implementation, padded): padded sdpa, packed varlen, packed sdpa (block mask)."""


@torch.no_grad()
def test_every_attention_path_matches_single_rows(tiny_models, monkeypatch):
    from verl_async.training import attention

    real, calls = attention.per_row_attention, []

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(attention, "per_row_attention", counted)
    rows = make_rows(12, seed=1)
    reference = []
    for r in rows:  # each row alone, no packing
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        lin = tiny_models["sdpa"].get_output_embeddings()
        logits = torch.nn.functional.linear(tiny_models["sdpa"].model(input_ids=ids).last_hidden_state[0], lin.weight)
        logp = torch.log_softmax(logits.float(), -1)
        p = len(r.prompt_ids)
        reference.append([logp[p - 1 + j, tok].item() for j, tok in enumerate(r.response_ids)])
    for impl, padded in PATHS:
        got: dict[int, list[float]] = {}
        mbs = make_micro_batches(rows, list(range(12)), 48, pad_id=0, padded=padded)
        assert len(mbs) > 1
        for mb in mbs:
            lp, ent = token_logprobs(tiny_models[impl], mb, temperature=1.0, entropy="no_grad")
            assert (ent[mb.response_mask] > 0).all()
            for j, i in enumerate(mb.row_ids):
                got[i] = lp[j, : len(rows[i].response_ids)].tolist()
        for i in range(12):
            assert got[i] == pytest.approx(reference[i], abs=2e-5), (impl, padded, i)
    assert calls, "the varlen path never ran our attention function"


def test_every_attention_path_gives_the_same_gradients(tiny_models):
    rows = [r for r in make_rows(16, seed=2) if r.response_ids]
    grads = {}
    for impl, padded in PATHS:
        model = tiny_models[impl]
        model.zero_grad(set_to_none=True)
        for mb in make_micro_batches(rows, list(range(len(rows))), 64, pad_id=0, padded=padded):
            lp, ent = token_logprobs(model, mb, temperature=0.8, entropy="grad")
            ((lp * mb.advantages[:, None] + 0.1 * ent) * mb.loss_mask).sum().backward()
        grads[(impl, padded)] = {n: p.grad.clone() for n, p in model.named_parameters()}
    base = grads[PATHS[0]]
    for path in PATHS[1:]:
        for name, g in grads[path].items():
            torch.testing.assert_close(g, base[name], atol=2e-5, rtol=1e-4, msg=f"{path} {name}")


def test_padded_text_rows_carry_no_mask_and_packed_rows_their_boundaries():
    rows = make_rows(5, seed=3)
    (pd,) = make_micro_batches(rows, list(range(5)), 1000, pad_id=0, padded=True)
    assert pd.layout == "padded" and pd.attention_mask is None and pd.cu_seq_lens is None
    (pk,) = make_micro_batches(rows, list(range(5)), 1000, pad_id=0, padded=False)
    lengths = [row_length(r) for r in rows]
    assert pk.cu_seq_lens.tolist() == [sum(lengths[:i]) for i in range(6)] and pk.max_seq_len == max(lengths)
    assert pk.loss_tokens == pd.loss_tokens == sum(len(r.loss_mask) for r in rows)


def test_bad_rows_are_rejected_with_the_row_index():
    good = TrainRow([1, 2], [3], [-0.1], [1], 0.0, [0])
    with pytest.raises(ValueError, match="TrainRow 1 has an empty prompt"):
        make_micro_batches([good, TrainRow([], [3], [-0.1], [1], 0.0, [0])], [0, 1], 100, pad_id=0)
    with pytest.raises(ValueError, match="TrainRow 0: response_ids, rollout_logprobs and loss_mask"):
        make_micro_batches([TrainRow([1], [3, 4], [-0.1], [1, 1], 0.0, [0, 0])], [0], 100, pad_id=0)


def test_fused_rms_norm_is_the_same_function(tiny_path):
    from verl_async.training.kernels import FusedRMSNorm, fuse_rms_norms

    plain = load_hf_model(tiny_path, ModelConfig(path=tiny_path)).eval()
    fused = load_hf_model(tiny_path, ModelConfig(path=tiny_path)).eval()
    names = [n for n, _ in fused.named_parameters()]
    assert fuse_rms_norms(fused) == 2 * 4 + 1  # per layer: input, post-attention, q, k; plus the final norm
    assert [n for n, _ in fused.named_parameters()] == names
    assert isinstance(fused.model.norm, FusedRMSNorm)
    rows = make_rows(6, seed=4)
    (mb,) = make_micro_batches(rows, list(range(6)), 1000, pad_id=0, padded=True)
    a, _ = token_logprobs(plain, mb, temperature=1.0)
    b, _ = token_logprobs(fused, mb, temperature=1.0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("padded", [True, False])
def test_compiled_decoder_layers_are_the_same_function(tiny_path, padded):
    """trainer.compile_layers: the same log-probs and gradients, recomputed layers included."""
    from verl_async.training.kernels import compile_decoder_layers

    impl = "sdpa" if padded else VARLEN_IMPLEMENTATION
    models = []
    for compiled in (False, True):
        model = load_hf_model(tiny_path, ModelConfig(path=tiny_path), attn_implementation=impl)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if compiled:
            assert compile_decoder_layers(model) == model.config.num_hidden_layers
        models.append(model.train())
    rows = [r for r in make_rows(10, seed=5) if r.response_ids]
    out = []
    for model in models:
        lps = []
        for mb in make_micro_batches(rows, list(range(len(rows))), 64, pad_id=0, padded=padded):
            lp, _ = token_logprobs(model, mb, temperature=1.0)
            (lp * mb.advantages[:, None] * mb.loss_mask).sum().backward()
            lps.append(lp.detach())
        out.append((lps, {n: p.grad for n, p in model.named_parameters()}))
    for a, b in zip(out[0][0], out[1][0], strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    for name, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], g, atol=2e-5, rtol=1e-4, msg=name)
