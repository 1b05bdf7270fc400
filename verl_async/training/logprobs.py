"""Log-probs (and entropy) of sampled tokens straight from hidden states, in chunks.

A [tokens, vocab] fp32 logits tensor is the largest object in an RL training step (16k tokens x
152k vocab = 10 GB, and autograd keeps more of the same). Here the output layer runs over a
few thousand tokens at a time inside one autograd Function: the forward keeps only the hidden
states and a logsumexp per token, and the backward recomputes each chunk's logits to form
the gradient. Peak extra memory is a few chunk x vocab fp32 buffers whatever the batch size.

With z = h W^T / T (T: sampling temperature), p = softmax(z), t the sampled token:
    logp_t = z_t - logsumexp(z)
    H      = logsumexp(z) - sum_j p_j z_j
    d logp_t / dz = onehot(t) - p
    d H / dz      = -p * (log p + H)
and dz/dh = W / T, dz/dW = h / T.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

CHUNK_BYTES = 1 << 30
"""fp32 logits per chunk (bytes): chunk tokens = CHUNK_BYTES / (4 * vocab), e.g. 1765 for a 152k vocab."""


def chunk_tokens(vocab: int) -> int:
    return max(16, CHUNK_BYTES // (4 * vocab))


def chunk_stats(z: torch.Tensor, targets: torch.Tensor, inv_temp: float, with_entropy: bool):
    """One chunk's forward from its raw logits z = h W^T [c, V] (any float dtype): fp32 (logp, lse, entropy)."""
    z = z.float()
    if inv_temp != 1.0:
        z = z * inv_temp
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
    ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1) if with_entropy else lse.new_empty(0)
    return logp, lse, ent


def chunk_grad_logits(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor | None,
                      grad_logp: torch.Tensor, grad_ent: torch.Tensor | None, inv_temp: float,
                      onehot_by_compare: bool) -> torch.Tensor:
    """d loss / d (h W^T) for one chunk, in z's dtype, from its raw logits z [c, V].

    `onehot_by_compare` adds the target term through a column == target comparison (one fused
    pass when compiled) instead of a scatter into the fp32 gradient (cheaper in eager mode)."""
    logp_all = z.float()
    if inv_temp != 1.0:
        logp_all = logp_all * inv_temp
    logp_all = logp_all.sub_(lse[:, None]) if logp_all is not z else logp_all - lse[:, None]
    p = logp_all.exp()
    g = grad_logp[:, None]
    gz = p.mul_(-g) if grad_ent is None else -p * (g + grad_ent[:, None] * (logp_all + ent[:, None]))
    if onehot_by_compare:
        cols = torch.arange(z.shape[-1], device=z.device)
        gz = gz + (cols[None, :] == targets[:, None]) * g
    else:
        gz.scatter_add_(-1, targets[:, None], g)
    if inv_temp != 1.0:
        gz = gz * inv_temp
    return gz.to(z.dtype)


_compiled_stats = None
_compiled_grad = None


def compiled_chunk_functions():
    """chunk_stats and chunk_grad_logits through torch.compile (each chunk's casts, exp, reductions
    and the target term fuse into a few passes over the bf16 logits instead of a dozen fp32 ones)."""
    global _compiled_stats, _compiled_grad
    if _compiled_stats is None:
        _compiled_stats = torch.compile(chunk_stats, dynamic=True)
        _compiled_grad = torch.compile(chunk_grad_logits, dynamic=True)
    return _compiled_stats, _compiled_grad


class _ChunkedLogprobs(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], targets [N]) -> (logp [N], entropy [N] or empty), fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp: float, with_entropy: bool, compiled: bool):
        n, chunk = hidden.shape[0], chunk_tokens(weight.shape[0])
        stats = compiled_chunk_functions()[0] if compiled else chunk_stats
        w = weight.to(hidden.dtype)
        logp = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        ent = hidden.new_empty(n if with_entropy else 0, dtype=torch.float32)
        for s in range(0, n, chunk):
            lp, ls, en = stats(hidden[s:s + chunk] @ w.T, targets[s:s + chunk], inv_temp, with_entropy)
            logp[s:s + chunk], lse[s:s + chunk] = lp, ls
            if with_entropy:
                ent[s:s + chunk] = en
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.inv_temp, ctx.compiled = inv_temp, compiled
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        inv_temp, chunk = ctx.inv_temp, chunk_tokens(weight.shape[0])
        grad_fn = compiled_chunk_functions()[1] if ctx.compiled else chunk_grad_logits
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        use_ent = grad_ent is not None and ent.numel() > 0
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            gz = grad_fn(h @ w.T, targets[s:s + chunk], lse[s:s + chunk], ent[s:s + chunk] if use_ent else None,
                         grad_logp[s:s + chunk], grad_ent[s:s + chunk] if use_ent else None, inv_temp,
                         ctx.compiled)
            if grad_hidden is not None:
                grad_hidden[s:s + chunk] = gz @ w
            if grad_weight is not None:
                grad_weight.add_(gz.T @ h)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                     with_entropy: bool = False, compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [N] (and entropy [N] when asked) of `targets` under logits = hidden @ weight.T / T.
    `compiled`: the per-chunk math through torch.compile (compiled_chunk_functions)."""
    inv_temp = 1.0 / temperature if temperature > 0 else 1.0
    with torch.autocast(hidden.device.type, enabled=False):
        logp, ent = _ChunkedLogprobs.apply(hidden, weight, targets, inv_temp, with_entropy, compiled)
    return logp, (ent if with_entropy else None)


@dataclass
class LogprobQuery:
    """What LogprobHead computes on its next call: the flat [B * L] positions whose hidden state
    predicts each target, the targets, the temperature, and whether entropy is wanted."""

    index: torch.Tensor
    targets: torch.Tensor
    temperature: float
    with_entropy: bool


class LogprobHead(torch.nn.Linear):
    """The model's output layer (same weight Parameter, so names and weight tying are unchanged)
    that, inside `head.query(...)`, returns per-token (log-prob, entropy) [N, 2] instead of logits.

    Computing inside the model's own forward matters under FSDP2: the output weight is
    gathered only while the root module runs."""

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)  # adopt linear's parameters instead of initialising new ones
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self._query: LogprobQuery | None = None
        self.compiled = False  # per-chunk math through torch.compile (trainer.compile_layers)

    @contextlib.contextmanager
    def query(self, q: LogprobQuery) -> Iterator[None]:
        self._query = q
        try:
            yield
        finally:
            self._query = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q = self._query
        if q is None:
            return super().forward(hidden)
        if self.bias is not None:
            raise ValueError("LogprobHead: an output layer with a bias is not supported")
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, q.index)
        logp, ent = chunked_logprobs(flat, self.weight, q.targets, q.temperature, q.with_entropy, self.compiled)
        return torch.stack((logp, ent if ent is not None else torch.zeros_like(logp)), dim=-1)


def install_logprob_head(model: torch.nn.Module) -> LogprobHead:
    """Swap the model's output layer for a LogprobHead (before FSDP wraps the model)."""
    head = model.get_output_embeddings()
    if isinstance(head, LogprobHead):
        return head
    if type(head) is not torch.nn.Linear:
        raise ValueError(f"the model's output layer is a {type(head).__name__}, not nn.Linear: "
                         "chunked log-probs cannot take it over")
    new = LogprobHead(head)
    model.set_output_embeddings(new)
    return new
