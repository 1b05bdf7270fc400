"""Every policy-loss variant against small hand-computed references (plain Python math)."""

import math

import pytest
import torch

from verl_async.algorithms.losses import aggregate, k3, loss_normaliser, policy_loss
from verl_async.config.algorithm import AlgorithmConfig

log = math.log


def cfg(**kw) -> AlgorithmConfig:
    base = {"policy_loss": "ppo", "is_correction": "none", "clip_ratio_low": 0.2, "clip_ratio_high": 0.28}
    return AlgorithmConfig(**(base | kw))


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def leaf(rows) -> torch.Tensor:
    return t(rows).requires_grad_(True)


def test_on_policy_ppo_is_minus_mean_advantage():
    logp = leaf([[-1.0, -2.0], [-0.5, -0.1]])
    loss, m = policy_loss(logp, logp.detach().clone(), t([1.0, -2.0]), t([[1, 1], [1, 1]]), cfg())
    assert loss.item() == pytest.approx(-(1 + 1 - 2 - 2) / 4)
    loss.backward()  # d/dlogp of -A * exp(logp - behav) at ratio 1 is -A / N
    assert logp.grad.flatten().tolist() == pytest.approx([-0.25, -0.25, 0.5, 0.5])
    assert m["train/pg_clipfrac"].item() == 0.0
    assert m["train/is_ratio_mean"].item() == pytest.approx(1.0)
    assert m["train/mismatch_kl"].item() == pytest.approx(0.0)


def test_clip_higher_asymmetric_bounds():
    ratios = [1.25, 1.3, 0.75, 0.85, 1.5]
    adv = [1.0, 1.0, -1.0, -1.0, -1.0]
    behav = t([[-1.0] * 5])
    logp = leaf([[-1.0 + log(r) for r in ratios]])
    loss, m = policy_loss(logp, behav, t([adv]), t([[1] * 5]), cfg(clip_ratio_low=0.2, clip_ratio_high=0.28))
    # -min(rA, clip(r, 0.8, 1.28) A) per token
    expected = [-1.25, -1.28, 0.8, 0.85, 1.5]
    assert loss.item() == pytest.approx(sum(expected) / 5)
    assert m["train/pg_clipfrac"].item() == pytest.approx(2 / 5)
    loss.backward()  # clipped tokens (r=1.3 with A>0, r=0.75 with A<0) get no gradient
    assert logp.grad[0].tolist() == pytest.approx([-1.25 / 5, 0.0, 0.0, 0.85 / 5, 1.5 / 5])

    sym, m_sym = policy_loss(logp, behav, t([adv]), t([[1] * 5]), cfg(clip_ratio_low=0.2, clip_ratio_high=0.2))
    assert sym.item() == pytest.approx((-1.2 - 1.2 + 0.8 + 0.85 + 1.5) / 5)  # 1.25 is clipped at 1.2 now
    assert m_sym["train/pg_clipfrac"].item() == pytest.approx(3 / 5)


def test_token_mean_vs_seq_mean():
    # per-token pg at ratio 1 is -A: row 0 has 1 token (A=3), row 1 has 3 tokens (A=1), one padding cell
    logp = leaf([[-1.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = t([[1, 0, 0], [1, 1, 1]])
    adv = t([3.0, 1.0])
    tok, _ = policy_loss(logp, logp.detach(), adv, mask, cfg(loss_agg="token_mean"))
    seq, _ = policy_loss(logp, logp.detach(), adv, mask, cfg(loss_agg="seq_mean"))
    assert tok.item() == pytest.approx(-(3 + 1 + 1 + 1) / 4)
    assert seq.item() == pytest.approx(-(3 / 1 + 3 / 3) / 2)
    assert loss_normaliser(mask, "token_mean") == 4
    assert loss_normaliser(mask, "seq_mean") == 2


def test_mask_excludes_tokens():
    mask = t([[1, 0, 1]])
    a = leaf([[-1.0, -7.0, -1.5]])
    behav = t([[-1.2, -1.0, -1.0]])
    loss_a, m_a = policy_loss(a, behav, t([1.0]), mask, cfg())
    b = leaf([[-1.0, 3.0, -1.5]])  # only the masked token differs
    loss_b, m_b = policy_loss(b, behav, t([1.0]), mask, cfg())
    assert loss_a.item() == pytest.approx(loss_b.item())
    for k in m_a:
        assert m_a[k].item() == pytest.approx(m_b[k].item()), k
    loss_a.backward()
    assert a.grad[0, 1].item() == 0.0
    expected = -(min(math.exp(0.2), 1.28) + math.exp(-0.5)) / 2  # r = e^0.2 < 1.28 unclipped; e^-0.5 unclipped for A>0
    assert loss_a.item() == pytest.approx(expected)


def test_decoupled_ratio_and_behaviour_weight():
    behav = t([[-1.0, -1.0]])
    prox = t([[-0.8, -1.3]])  # w = exp(0.2), exp(-0.3)
    logp = leaf([[-0.7, -1.3]])  # r = exp(0.1), 1
    loss, m = policy_loss(logp, behav, t([2.0]), t([[1, 1]]), cfg(policy_loss="decoupled_ppo"), proximal_logprobs=prox)
    w = [math.exp(0.2), math.exp(-0.3)]
    r = [math.exp(0.1), 1.0]
    assert loss.item() == pytest.approx(-(w[0] * r[0] * 2 + w[1] * r[1] * 2) / 2)
    loss.backward()  # w is a constant: d/dlogp = -w * r * A / N
    assert logp.grad[0].tolist() == pytest.approx([-w[0] * r[0], -w[1] * r[1]])
    assert m["train/is_ratio_mean"].item() == pytest.approx(sum(w) / 2)
    assert m["train/is_ratio_max"].item() == pytest.approx(w[0])
    kl = [math.exp(x) - 1 - x for x in (0.2, -0.3)]  # k3 of trainer (proximal) vs behaviour
    assert m["train/mismatch_kl"].item() == pytest.approx(sum(kl) / 2)


def test_decoupled_clips_against_proximal_not_behaviour():
    behav = t([[-2.0]])
    prox = t([[-1.0]])  # w = e (2.72, stale sample)
    logp = leaf([[-1.0 + log(1.5)]])  # r = 1.5 vs proximal (clipped at 1.28); 4.08 vs behaviour
    loss, m = policy_loss(logp, behav, t([1.0]), t([[1]]), cfg(policy_loss="decoupled_ppo", is_threshold=5.0),
                          proximal_logprobs=prox)
    assert loss.item() == pytest.approx(-math.e * 1.28)
    assert m["train/pg_clipfrac"].item() == 1.0


def test_decoupled_needs_proximal():
    x = t([[-1.0]])
    with pytest.raises(ValueError, match="proximal"):
        policy_loss(x, x, t([1.0]), t([[1]]), cfg(policy_loss="decoupled_ppo"))


def test_ppo_ignores_proximal():
    behav = t([[-1.0, -2.0]])
    logp = leaf([[-1.1, -1.9]])
    a, _ = policy_loss(logp, behav, t([1.0]), t([[1, 1]]), cfg(policy_loss="ppo"))
    b, _ = policy_loss(logp, behav, t([1.0]), t([[1, 1]]), cfg(policy_loss="ppo"), proximal_logprobs=t([[0.0, 0.0]]))
    assert a.item() == pytest.approx(b.item())


def tis_mis_inputs():
    behav = t([[-1.0, -1.0, -1.0]])
    prox = t([[-1.0 + log(3.0), -1.0 + log(0.5), -1.0 + log(1.5)]])  # w = 3, 0.5, 1.5
    return prox.clone(), behav, prox  # logp == prox: r = 1


def test_tis_truncates_weight():
    logp, behav, prox = tis_mis_inputs()
    loss, m = policy_loss(logp, behav, t([1.0]), t([[1, 1, 1]]),
                          cfg(policy_loss="decoupled_ppo", is_correction="tis", is_threshold=2.0), proximal_logprobs=prox)
    assert loss.item() == pytest.approx(-(2.0 + 0.5 + 1.5) / 3)
    assert m["train/is_ratio_max"].item() == pytest.approx(3.0)  # metrics report the raw weight
    assert m["train/is_masked_frac"].item() == pytest.approx(1 / 3)


def test_mis_masks_tokens_above_threshold_keeping_denominator():
    logp, behav, prox = tis_mis_inputs()
    logp = logp.requires_grad_(True)
    loss, m = policy_loss(logp, behav, t([1.0]), t([[1, 1, 1]]),
                          cfg(policy_loss="decoupled_ppo", is_correction="mis", is_threshold=2.0), proximal_logprobs=prox)
    assert loss.item() == pytest.approx(-(0.0 + 0.5 + 1.5) / 3)
    assert m["train/is_masked_frac"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0


def test_none_keeps_raw_weight():
    logp, behav, prox = tis_mis_inputs()
    loss, _ = policy_loss(logp, behav, t([1.0]), t([[1, 1, 1]]), cfg(policy_loss="decoupled_ppo"), proximal_logprobs=prox)
    assert loss.item() == pytest.approx(-(3.0 + 0.5 + 1.5) / 3)


def test_kl_to_reference_k3():
    logp = leaf([[-1.0, -2.0]])
    ref = t([[-1.5, -1.0]])
    loss, m = policy_loss(logp, logp.detach(), t([0.0]), t([[1, 1]]), cfg(kl_coef=0.1), ref_logprobs=ref)
    kl = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]  # exp(ref - logp) - 1 - (ref - logp)
    assert m["train/kl"].item() == pytest.approx(sum(kl) / 2)
    assert loss.item() == pytest.approx(0.1 * sum(kl) / 2)  # A = 0: only the KL term remains
    loss.backward()  # d/dlogp k3 = 1 - exp(ref - logp)
    assert logp.grad[0].tolist() == pytest.approx([0.1 * (1 - math.exp(-0.5)) / 2, 0.1 * (1 - math.exp(1.0)) / 2])
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logp, logp.detach(), t([0.0]), t([[1, 1]]), cfg(kl_coef=0.1))


def test_entropy_bonus_and_metric():
    logp = leaf([[-1.0, -1.0]])
    ent = t([[0.5, 1.5]])
    base, m = policy_loss(logp, logp.detach(), t([1.0]), t([[1, 1]]), cfg(), entropy=ent)
    assert m["train/entropy"].item() == pytest.approx(1.0)
    bonus, _ = policy_loss(logp, logp.detach(), t([1.0]), t([[1, 1]]), cfg(entropy_coef=0.01), entropy=ent)
    assert bonus.item() == pytest.approx(base.item() - 0.01 * 1.0)


def test_global_normaliser_splits_exactly():
    """Micro-batches summed with the mini-batch's normaliser equal one pass over all rows."""
    torch.manual_seed(0)
    logp = torch.randn(4, 5, dtype=torch.float64) - 2
    behav = logp + 0.1 * torch.randn(4, 5, dtype=torch.float64)
    prox = logp + 0.05 * torch.randn(4, 5, dtype=torch.float64)
    mask = t([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    adv = t([1.0, -0.5, 2.0, -1.0])
    for agg in ("token_mean", "seq_mean"):
        c = cfg(policy_loss="decoupled_ppo", is_correction="tis", loss_agg=agg)
        full, _ = policy_loss(logp, behav, adv, mask, c, proximal_logprobs=prox)
        n = loss_normaliser(mask, agg)
        parts = [policy_loss(logp[s], behav[s], adv[s], mask[s], c, proximal_logprobs=prox[s], normaliser=n)[0]
                 for s in (slice(0, 1), slice(1, 4))]
        assert sum(p.item() for p in parts) == pytest.approx(full.item())


def test_aggregate_and_k3_helpers():
    x = t([[1.0, 2.0], [3.0, 0.0]])
    mask = t([[1, 1], [1, 0]])
    assert aggregate(x, mask, "token_mean").item() == pytest.approx(2.0)
    assert aggregate(x, mask, "seq_mean").item() == pytest.approx((1.5 + 3.0) / 2)
    assert aggregate(x, mask, "token_mean", normaliser=6).item() == pytest.approx(1.0)
    assert k3(t([0.0])).item() == 0.0
    assert (k3(t([-3.0, 0.5, 2.0])) > 0).all()


def test_empty_mask_is_finite():
    logp = leaf([[-1.0]])
    loss, m = policy_loss(logp, logp.detach(), t([1.0]), t([[0]]), cfg(policy_loss="decoupled_ppo"),
                          proximal_logprobs=logp.detach())
    assert loss.item() == 0.0
    assert all(math.isfinite(v.item()) for v in m.values())
    loss.backward()
    assert logp.grad.abs().sum().item() == 0.0
