"""The policy loss: PPO-clip with clip-higher, decoupled PPO, TIS / MIS, KL and entropy terms.

Notation (per response token t, all log-probs of the sampled token):
    logp   current policy pi_theta (carries the gradient)
    prox   proximal policy pi_prox: the trainer's own log-probs before this batch's first update
    behav  behaviour policy mu: what the rollout engine sampled with (possibly a few versions old)

    r_t = exp(logp - anchor)   anchor = prox (decoupled_ppo) or behav (ppo)
    w_t = exp(prox - behav)    behaviour -> proximal importance weight, no gradient (1 under ppo)
          tis: w_t = min(w_t, C);  mis: w_t = w_t * 1[w_t <= C];  none: as is   (C = is_threshold)
    pg_t = -w_t * min(r_t * A, clip(r_t, 1 - eps_low, 1 + eps_high) * A)
    loss = agg(pg) + kl_coef * agg(k3(logp, ref)) - entropy_coef * agg(entropy)

Decoupled PPO (Hilton et al. 2021; AReaL) clips against pi_prox so that the trust region is
around the weights being updated, not around the stale policy that sampled; w_t corrects
for the sampling policy. Tensors are [B, T] (sequences x response tokens, right-padded);
padding positions must have loss_mask 0.
"""

import torch

from verl_async.config.algorithm import AlgorithmConfig

MAX_LOG_RATIO = 20.0
"""Log-ratios are clamped to +-MAX_LOG_RATIO before exp (keeps ratios and their metrics finite)."""


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (0 when the mask is empty)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def loss_normaliser(loss_mask: torch.Tensor, loss_agg: str) -> int:
    """The denominator of `aggregate` for these rows: masked tokens (token_mean) or sequences
    with at least one masked token (seq_mean). Summed over micro-batches and ranks by the
    trainer so that the whole mini-batch shares one denominator."""
    if loss_agg == "token_mean":
        return int(loss_mask.sum().item())
    if loss_agg == "seq_mean":
        return int((loss_mask.sum(-1) > 0).sum().item())
    raise ValueError(f"unknown loss_agg {loss_agg!r}: use token_mean or seq_mean")


def aggregate(x: torch.Tensor, loss_mask: torch.Tensor, loss_agg: str, normaliser: float | None = None) -> torch.Tensor:
    """Reduce per-token values [B, T] to a scalar.

    token_mean: sum_{i,t} m_it x_it / N_tokens
    seq_mean:   sum_i (sum_t m_it x_it / sum_t m_it) / N_seqs

    `normaliser` replaces N_tokens / N_seqs (the global count of a mini-batch split over
    micro-batches and ranks); None uses this call's own count.
    """
    mask = loss_mask.to(x.dtype)
    if loss_agg == "token_mean":
        total = (x * mask).sum()
    elif loss_agg == "seq_mean":
        total = ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    else:
        raise ValueError(f"unknown loss_agg {loss_agg!r}: use token_mean or seq_mean")
    if normaliser is None:
        normaliser = loss_normaliser(loss_mask, loss_agg)
    return total / max(float(normaliser), 1.0)


def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(q || p) from samples of q, with log_ratio = log p - log q:
    exp(log_ratio) - 1 - log_ratio  (non-negative, unbiased)."""
    log_ratio = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(log_ratio) - 1.0 - log_ratio


def importance_weight(proximal: torch.Tensor, behaviour: torch.Tensor, cfg: AlgorithmConfig
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w after the IS correction, raw w) with w = exp(prox - behav), both without gradient."""
    raw = torch.exp((proximal - behaviour).detach().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    if cfg.is_correction == "tis":
        return raw.clamp(max=cfg.is_threshold), raw
    if cfg.is_correction == "mis":
        return raw * (raw <= cfg.is_threshold).to(raw.dtype), raw
    return raw, raw


def policy_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: AlgorithmConfig,
    proximal_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to minimise and its metrics (detached scalars, means over this call's masked tokens).

    advantages: [B] (one per sequence, broadcast over tokens) or [B, T].
    proximal_logprobs: required by decoupled_ppo; ignored by ppo (the anchor is the behaviour policy).
    ref_logprobs: required when kl_coef > 0. entropy: per-token entropy of pi_theta, required
    when entropy_coef > 0 (otherwise only reported if given).
    """
    if cfg.policy_loss == "decoupled_ppo":
        if proximal_logprobs is None:
            raise ValueError("decoupled_ppo needs proximal_logprobs: recompute them with the trainer before the update.")
        proximal = proximal_logprobs.detach()
    else:
        proximal = behaviour_logprobs.detach()
    mask = loss_mask.to(logprobs.dtype)
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(logprobs)
    adv = adv.to(logprobs.dtype)

    w, raw_w = importance_weight(proximal, behaviour_logprobs, cfg)
    ratio = torch.exp((logprobs - proximal).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high) * adv
    pg = -w * torch.minimum(unclipped, clipped)
    loss = aggregate(pg, loss_mask, cfg.loss_agg, normaliser)

    kl = torch.zeros_like(logprobs)
    if cfg.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("algorithm.kl_coef > 0 needs ref_logprobs from the reference model.")
        kl = k3(ref_logprobs.detach() - logprobs)  # KL(pi_theta || pi_ref), samples from pi_theta
        loss = loss + cfg.kl_coef * aggregate(kl, loss_mask, cfg.loss_agg, normaliser)
    if cfg.entropy_coef != 0:
        if entropy is None:
            raise ValueError("algorithm.entropy_coef != 0 needs the per-token entropy.")
        loss = loss - cfg.entropy_coef * aggregate(entropy, loss_mask, cfg.loss_agg, normaliser)

    trainer_lp = (proximal_logprobs if proximal_logprobs is not None else logprobs).detach()
    with torch.no_grad():
        metrics = {
            "train/pg_loss": aggregate(pg, loss_mask, cfg.loss_agg),
            "train/pg_clipfrac": masked_mean((clipped < unclipped).to(mask.dtype), mask),
            "train/is_ratio_mean": masked_mean(raw_w, mask),
            "train/is_ratio_max": raw_w[mask > 0].max() if mask.any() else raw_w.new_zeros(()),
            "train/is_masked_frac": masked_mean((raw_w > cfg.is_threshold).to(mask.dtype), mask),
            "train/mismatch_kl": masked_mean(k3(trainer_lp - behaviour_logprobs), mask),
            "train/entropy": masked_mean(entropy, mask) if entropy is not None else mask.new_zeros(()),
            "train/kl": masked_mean(kl, mask),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}
