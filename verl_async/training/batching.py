"""Turn TrainRows into model inputs: mini-batches, per-rank shares and token-budget micro-batches.

Two layouts (training/attention.py says which attention each one runs):
- packed: one [1, L] sequence of concatenated rows, position_ids restarting at 0 for each row
  and `cu_seq_lens` marking the row boundaries; no token is padding.
- padded: [B, L] right-padded rows. Text rows need no attention mask (causal attention never
  looks right); rows with multi_modal_inputs carry one (the model derives mrope positions from it).
Pure: no model, no process group.
"""

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from verl_async.types import TrainRow

logger = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    """One forward/backward pass. Invariant: logits_index has one entry per True cell of
    response_mask, in row-major order, so `x[response_mask] = per_token_values` lines up."""

    layout: str  # "packed" or "padded"
    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor | None  # [1, L] packed layout; None: the model derives positions
    attention_mask: torch.Tensor | None  # [B, L] padded vision-language rows only
    cu_seq_lens: torch.Tensor | None  # [R + 1] int32 row boundaries in the packed sequence
    max_seq_len: int  # longest row (packed: the varlen kernel's max_length)
    loss_tokens: int  # loss_mask.sum(), counted on the host when the micro-batch is built
    logits_index: torch.Tensor  # [N] positions in the flattened [B * L] input whose logits predict response tokens
    targets: torch.Tensor  # [N] the response tokens
    response_mask: torch.Tensor  # [R, T] bool, R rows, T = longest response
    rollout_logprobs: torch.Tensor  # [R, T]
    loss_mask: torch.Tensor  # [R, T] float 0/1
    advantages: torch.Tensor  # [R]
    row_ids: list[int]  # indices of these rows in the list they were packed from; empty for a padding pass
    extra_inputs: dict[str, Any] = field(default_factory=dict)  # further model kwargs (vision inputs)
    proximal_logprobs: torch.Tensor | None = None  # [R, T], filled by the trainer before updates
    ref_logprobs: torch.Tensor | None = None  # [R, T], filled when a reference model is kept

    @property
    def packed(self) -> bool:
        return self.layout == "packed"

    @property
    def num_tokens(self) -> int:
        """Positions fed to the model, padding included."""
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> "MicroBatch":
        def move(x: Any) -> Any:
            return x.to(device) if isinstance(x, torch.Tensor) else x

        return replace(self, **{k: move(getattr(self, k)) for k in (
            "input_ids", "position_ids", "attention_mask", "cu_seq_lens", "logits_index", "targets", "response_mask",
            "rollout_logprobs", "loss_mask", "advantages", "proximal_logprobs", "ref_logprobs")},
            extra_inputs={k: move(v) for k, v in self.extra_inputs.items()})


def row_length(row: TrainRow) -> int:
    return len(row.prompt_ids) + len(row.response_ids)


def split_mini_batches(num_rows: int, mini_batches: int) -> list[list[int]]:
    """Contiguous, near-equal chunks of row indices (the first chunks take the remainder)."""
    return [c.tolist() for c in torch.arange(num_rows).tensor_split(mini_batches)]


def shard_rows(row_ids: list[int], lengths: list[int], world_size: int) -> list[list[int]]:
    """Balance rows over ranks by tokens: longest first, each to the least-loaded rank.
    Deterministic, so every rank computes the same split from the same batch."""
    loads = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(row_ids, key=lambda i: (-lengths[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shards[rank].append(i)
        loads[rank] += lengths[i]
    return [sorted(s) for s in shards]


def plan_micro_batches(row_ids: list[int], lengths: list[int], max_tokens: int, padded: bool) -> list[list[int]]:
    """First-fit decreasing: bins of row ids whose cost stays <= max_tokens. Cost is the sum of
    lengths (packed) or rows * longest (padded). A row over the budget gets a bin of its own."""
    bins: list[list[int]] = []
    costs: list[tuple[int, int]] = []  # (sum of lengths, longest)
    for i in sorted(row_ids, key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > max_tokens:
            logger.warning("a row of %d tokens exceeds trainer.micro_batch_max_tokens=%d: it gets a micro-batch "
                           "of its own; raise the budget if this runs out of memory.", n, max_tokens)
        for b, (total, longest) in enumerate(costs):
            cost = (len(bins[b]) + 1) * max(longest, n) if padded else total + n
            if cost <= max_tokens:
                bins[b].append(i)
                costs[b] = (total + n, max(longest, n))
                break
        else:
            bins.append([i])
            costs.append((n, n))
    return [sorted(b) for b in bins]


def pad_2d(values: list[list[float]], width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Right-pad ragged per-token lists to [len(values), width] with zeros."""
    out = torch.zeros(len(values), width, dtype=dtype)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.as_tensor(v, dtype=dtype)
    return out


def collate_extra_inputs(rows: list[TrainRow]) -> dict[str, Any]:
    """Concatenate each multi_modal_inputs key along dim 0 (Qwen-VL style pixel_values, image_grid_thw)."""
    with_mm = [r.multi_modal_inputs for r in rows if r.multi_modal_inputs]
    if not with_mm:
        return {}
    keys = set(with_mm[0])
    if any(set(m) != keys for m in with_mm):
        raise ValueError(f"rows of one micro-batch have different multi_modal_inputs keys: {[sorted(m) for m in with_mm]}")
    return {k: torch.cat([torch.as_tensor(m[k]) for m in with_mm], dim=0) for k in sorted(keys)}


def build_micro_batch(rows: list[TrainRow], row_ids: list[int], pad_id: int, padded: bool) -> MicroBatch:
    """Lay out rows[row_ids] as one model input (packed or padded, see the module docstring)."""
    picked = [rows[i] for i in row_ids]
    for i, r in zip(row_ids, picked, strict=True):
        if not r.prompt_ids:
            raise ValueError(f"TrainRow {i} has an empty prompt: its first response token has no logit to come from.")
        if not len(r.response_ids) == len(r.rollout_logprobs) == len(r.loss_mask):
            raise ValueError(f"TrainRow {i}: response_ids, rollout_logprobs and loss_mask must have the same length, "
                             f"got {len(r.response_ids)}, {len(r.rollout_logprobs)}, {len(r.loss_mask)}.")
    seqs = [r.prompt_ids + r.response_ids for r in picked]
    lengths = [len(s) for s in seqs]
    width = max((len(r.response_ids) for r in picked), default=0)
    # the logit at position p predicts token p + 1: a row's response logits start one before its response
    starts = ([b * max(lengths) for b in range(len(seqs))] if padded
              else torch.tensor([0, *lengths[:-1]]).cumsum(0).tolist())
    logits_index = [i for s, r in zip(starts, picked, strict=True)
                    for i in range(s + len(r.prompt_ids) - 1, s + len(r.prompt_ids) - 1 + len(r.response_ids))]
    position_ids = attention_mask = cu_seq_lens = None
    if padded:
        input_ids = torch.full((len(seqs), max(lengths)), pad_id, dtype=torch.long)
        for b, s in enumerate(seqs):
            input_ids[b, : len(s)] = torch.tensor(s)
        if any(r.multi_modal_inputs for r in picked):
            attention_mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    else:
        input_ids = torch.tensor([tok for s in seqs for tok in s], dtype=torch.long)[None]
        position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
        cu_seq_lens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    loss_mask = pad_2d([[float(m) for m in r.loss_mask] for r in picked], width)
    return MicroBatch(
        layout="padded" if padded else "packed",
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        cu_seq_lens=cu_seq_lens,
        max_seq_len=max(lengths),
        loss_tokens=int(loss_mask.sum().item()),
        logits_index=torch.tensor(logits_index, dtype=torch.long),
        targets=torch.tensor([t for r in picked for t in r.response_ids], dtype=torch.long),
        response_mask=pad_2d([[1.0] * len(r.response_ids) for r in picked], width).bool(),
        rollout_logprobs=pad_2d([r.rollout_logprobs for r in picked], width),
        loss_mask=loss_mask,
        advantages=torch.tensor([r.advantage for r in picked], dtype=torch.float32),
        row_ids=list(row_ids),
        extra_inputs=collate_extra_inputs(picked),
    )


def uses_padded_layout(rows: list[TrainRow], row_ids: list[int]) -> bool:
    """Rows with vision inputs go through the padded layout (the model derives their positions)."""
    return any(rows[i].multi_modal_inputs for i in row_ids)


def make_micro_batches(rows: list[TrainRow], row_ids: list[int], max_tokens: int, pad_id: int,
                       padded: bool | None = None) -> list[MicroBatch]:
    """Pack rows[row_ids] into micro-batches of at most max_tokens positions each
    (padded: None picks the layout from the rows, see uses_padded_layout)."""
    if not row_ids:
        return []
    if padded is None:
        padded = uses_padded_layout(rows, row_ids)
    lengths = [row_length(r) for r in rows]
    plan = plan_micro_batches(row_ids, lengths, max_tokens, padded)
    return [build_micro_batch(rows, ids, pad_id, padded) for ids in plan]


def dummy_micro_batch(pad_id: int, like: TrainRow | None = None, padded: bool = False) -> MicroBatch:
    """A one-token pass with an empty loss mask. Ranks with fewer micro-batches run these so that
    every rank makes the same number of forward/backward calls (FSDP2 collectives must match).
    `like`: a VL row, copied with its loss masked, so the vision tower's blocks run too."""
    if like is not None:
        row = replace(like, loss_mask=[0] * len(like.loss_mask))
        return replace(build_micro_batch([row], [0], pad_id, padded=True), row_ids=[])
    row = TrainRow(prompt_ids=[pad_id], response_ids=[pad_id], rollout_logprobs=[0.0], loss_mask=[0],
                   advantage=0.0, policy_versions=[0])
    return replace(build_micro_batch([row], [0], pad_id, padded=padded), row_ids=[])
