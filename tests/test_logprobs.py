"""Chunked log-probs from hidden states (training/logprobs.py) against plain autograd on full logits."""

import pytest
import torch

from verl_async.training import logprobs as lp_mod
from verl_async.training.logprobs import (
    LogprobHead,
    LogprobQuery,
    chunked_logprobs,
    install_logprob_head,
)


def reference(hidden, weight, targets, temperature):
    logits = (hidden @ weight.T) / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_values_and_gradients_match_full_logits(monkeypatch, temperature, with_entropy, compiled):
    monkeypatch.setattr(lp_mod, "CHUNK_BYTES", 4 * 50 * 7)  # 7 tokens a chunk: 37 tokens span 6 chunks
    torch.manual_seed(0)
    n, h, v = 37, 16, 50
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    g_lp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)

    ref_lp, ref_ent = reference(hidden, weight, targets, temperature)
    ref_loss = (ref_lp * g_lp).sum() + ((ref_ent * g_ent).sum() if with_entropy else 0.0)
    ref_gh, ref_gw = torch.autograd.grad(ref_loss, (hidden, weight))

    got_lp, got_ent = chunked_logprobs(hidden, weight, targets, temperature, with_entropy, compiled=compiled)
    loss = (got_lp * g_lp).sum() + ((got_ent * g_ent).sum() if with_entropy else 0.0)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert got_lp.dtype == torch.float32  # log-probs are always fp32
    torch.testing.assert_close(got_lp.double(), ref_lp, atol=1e-5, rtol=0)
    if with_entropy:
        torch.testing.assert_close(got_ent.double(), ref_ent, atol=1e-5, rtol=0)
    else:
        assert got_ent is None
    torch.testing.assert_close(gh, ref_gh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=1e-5)


def test_head_keeps_the_parameter_and_serves_plain_logits_outside_a_query():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(30, 8)
    model = torch.nn.Module()
    lin = torch.nn.Linear(8, 30, bias=False)
    lin.weight = emb.weight  # tied

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lm_head = emb, lin

        def get_output_embeddings(self):
            return self.lm_head

        def set_output_embeddings(self, m):
            self.lm_head = m

        def forward(self, ids):
            return self.lm_head(self.emb(ids))

    model = Tiny()
    head = install_logprob_head(model)
    assert isinstance(head, LogprobHead) and head.weight is emb.weight
    assert [n for n, _ in model.named_parameters()] == ["emb.weight"]  # still tied, same names
    ids = torch.randint(0, 30, (2, 5))
    logits = model(ids)
    assert logits.shape == (2, 5, 30)
    index, targets = torch.tensor([0, 3, 7]), torch.tensor([1, 2, 3])
    with head.query(LogprobQuery(index=index, targets=targets, temperature=1.0, with_entropy=True)):
        per_token = model(ids)
    expected = torch.log_softmax(logits.reshape(-1, 30)[index], -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(per_token[:, 0], expected, atol=1e-6, rtol=0)
    assert (per_token[:, 1] > 0).all()
    assert model(ids).shape == (2, 5, 30)  # the query ended with the context
