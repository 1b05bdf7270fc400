"""One trainer process: holds a shard of the policy, trains on TrainBatches, hands out weights.

A plain class; launch code (training.group) makes it a Ray actor. Every rank receives the
whole batch and derives the same plan from it (mini-batches, its share of rows, micro-batch
counts padded to the largest rank's), so no collective is needed to agree on the work and
every rank makes the same number of FSDP2 forward/backward calls.
"""

import logging
import random
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from verl_async.algorithms.losses import loss_normaliser, policy_loss
from verl_async.config.algorithm import AlgorithmConfig
from verl_async.config.model import ModelConfig
from verl_async.config.trainer import TrainerConfig
from verl_async.data.vision import is_vl_model
from verl_async.training import checkpoint
from verl_async.training.attention import resolve_attention
from verl_async.training.batching import (
    MicroBatch,
    dummy_micro_batch,
    make_micro_batches,
    pad_2d,
    plan_micro_batches,
    row_length,
    shard_rows,
    split_mini_batches,
    uses_padded_layout,
)
from verl_async.training.guards import NonFiniteGuard
from verl_async.training.model import (
    DTYPES,
    build_model,
    full_tensors,
    make_scheduler,
    token_logprobs,
)
from verl_async.types import TensorMeta, TrainBatch, TrainMetrics, TrainRow

logger = logging.getLogger(__name__)

MEAN_METRICS = ("train/pg_loss", "train/pg_clipfrac", "train/is_ratio_mean", "train/is_masked_frac",
                "train/mismatch_kl", "train/entropy", "train/kl")
"""Loss metrics averaged over loss tokens (weighted by each micro-batch's masked tokens)."""


class TrainerWorker:
    """Rank `rank` of `world_size` trainer processes. Call setup() once before anything else.

    step: optimizer steps completed (one per train_step call, whatever mini_batches is);
    policy_version: the version of the weights this worker holds (completed train_step calls).
    """

    def __init__(self, rank: int, world_size: int, model_path: str, model: ModelConfig, trainer: TrainerConfig,
                 algorithm: AlgorithmConfig, total_steps: int, device: str, temperature: float = 1.0):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device={device!r}: use cpu or cuda")
        self.rank, self.world_size = rank, world_size
        self.model_path, self.model_cfg, self.cfg, self.algo = model_path, model, trainer, algorithm
        self.total_steps, self.device_type, self.temperature = total_steps, device, temperature
        self.step = 0
        self.policy_version = 0
        self.nonfinite = NonFiniteGuard(trainer.max_nonfinite_skips)  # skipped updates still count as steps
        self._sender: Any = None

    # ---- setup -------------------------------------------------------------------------------

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to host the process group's store."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def check_gpu_memory(self, plan: Any) -> dict[str, float]:
        """Shared GPU, before setup: fail if the trainer will not fit beside the engine, then cap this
        process's allocator so it never takes the engine's memory (plan: memory.SharedGpuPlan)."""
        from verl_async.training.memory import guard_shared_gpu

        return guard_shared_gpu(plan)

    def setup(self, master_address: str, master_port: int) -> None:
        """Join the process group (nccl on GPU, gloo on CPU), build model, optimizer and schedule."""
        if self.device_type == "cuda":
            torch.cuda.set_device(self.rank % torch.cuda.device_count())  # Ray shows each actor one GPU
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        dist.init_process_group(
            "nccl" if self.device_type == "cuda" else "gloo", init_method=f"tcp://{master_address}:{master_port}",
            rank=self.rank, world_size=self.world_size,
            **({"device_id": self.device} if self.device_type == "cuda" else {}))
        seed = self.cfg.seed + self.rank
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

        compute = DTYPES[self.model_cfg.dtype]
        self.layout = resolve_attention(self.cfg.attention, self.device, compute, vision=is_vl_model(self.model_path))
        build = {"layout": self.layout, "fused_norms": self.cfg.fused_norms, "compile_layers": self.cfg.compile_layers}
        self.model = build_model(self.model_path, self.model_cfg, self.device, self.cfg.fsdp, trainable=True, **build)
        self.ref_model = (build_model(self.model_path, self.model_cfg, self.device, self.cfg.fsdp, trainable=False,
                                      **build) if self.algo.kl_coef > 0 else None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        fused = self.cfg.fused_optimizer and self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, betas=tuple(self.cfg.betas),
                                           weight_decay=self.cfg.weight_decay, **({"fused": True} if fused else {}))
        self.scheduler = make_scheduler(self.optimizer, self.cfg.warmup_steps, self.total_steps, self.cfg.lr_schedule)
        self.autocast = compute if (not self.cfg.fsdp and compute != torch.float32) else None
        hf = self.model.config.get_text_config()  # a VL config keeps its token ids in the text config
        pad = getattr(hf, "pad_token_id", None)  # transformers 5 configs only have the ids they declare
        self.pad_id = pad if pad is not None else (getattr(hf, "eos_token_id", None) or 0)
        logger.info("trainer rank %d/%d ready on %s (fsdp=%s, dtype=%s, %s rows, reference model=%s)", self.rank,
                    self.world_size, self.device, self.cfg.fsdp, self.model_cfg.dtype, self.layout,
                    self.ref_model is not None)

    def state(self) -> dict[str, int]:
        return {"step": self.step, "policy_version": self.policy_version}

    # ---- training ----------------------------------------------------------------------------

    def train_step(self, batch: TrainBatch) -> TrainMetrics:
        """ppo_epochs x mini_batches optimizer updates on this rank's share of batch.rows."""
        if batch.step != self.step:
            raise ValueError(f"batch.step={batch.step} but this trainer has completed {self.step} steps: a batch "
                             "must carry the 0-based index of the step it is for (a step counted twice or skipped?)")
        if not batch.rows:
            raise ValueError("TrainBatch.rows is empty: the pipeline must not send empty batches.")
        start = time.perf_counter()
        rows = batch.rows
        minis = split_mini_batches(len(rows), self.cfg.mini_batches)
        plans = [self._rank_micro_batches(rows, ids) for ids in minis]
        norms = [self._normaliser(rows, ids) for ids in minis]
        self._fill_logprobs([mb for plan in plans for mb in plan])

        sums = dict.fromkeys(MEAN_METRICS, 0.0)
        weight, is_max, losses, grad_norms = 0.0, 0.0, [], []
        lr = self.scheduler.get_last_lr()[0]
        self.model.train()
        for _ in range(self.cfg.ppo_epochs):
            for plan, norm in zip(plans, norms, strict=True):
                loss_sum, grad_norm, stats = self._update(plan, norm)
                losses.append(loss_sum)
                grad_norms.append(grad_norm)
                for k in MEAN_METRICS:
                    sums[k] += stats[k]
                weight += stats["weight"]
                is_max = max(is_max, stats["train/is_ratio_max"])
        self.scheduler.step()
        self.step += 1
        self.policy_version += 1

        reduced = self._all_reduce([*sums.values(), weight, *losses], dist.ReduceOp.SUM)
        is_max = self._all_reduce([is_max], dist.ReduceOp.MAX)[0]
        total_weight = reduced[len(MEAN_METRICS)]
        metrics = {k: v / max(total_weight, 1.0) for k, v in zip(MEAN_METRICS, reduced, strict=False)}
        metrics |= {
            "train/loss": float(np.mean(reduced[len(MEAN_METRICS) + 1:])),
            "train/grad_norm": float(np.mean(grad_norms)),
            "train/lr": lr,
            "train/is_ratio_max": is_max,
            "train/tokens": float(sum(row_length(r) for r in rows)),
            "train/loss_tokens": float(sum(sum(r.loss_mask) for r in rows)),
            "train/step_s": time.perf_counter() - start,
            "train/nonfinite_skips": float(self.nonfinite.skips),
        }
        return TrainMetrics(step=batch.step, metrics=metrics)

    def _update(self, plan: list[MicroBatch], normaliser: int) -> tuple[float, float, dict[str, float]]:
        """One optimizer update over this rank's micro-batches of one mini-batch. Metrics stay on
        the device until the update is done: one host sync per update, not several per micro-batch."""
        self.optimizer.zero_grad(set_to_none=True)
        entropy = "grad" if self.algo.entropy_coef != 0 else "no_grad"
        acc = torch.zeros(len(MEAN_METRICS) + 2, dtype=torch.float64, device=self.device)  # sums, loss, is_max
        weight = 0.0
        for mb in plan:
            logp, ent = token_logprobs(self.model, mb, self.temperature, entropy, self.autocast)
            # One update per batch: the proximal policy is the current one (no extra forward pass).
            proximal = mb.proximal_logprobs if mb.proximal_logprobs is not None else logp.detach()
            loss, metrics = policy_loss(logp, mb.rollout_logprobs, mb.advantages, mb.loss_mask, self.algo,
                                        proximal_logprobs=proximal, ref_logprobs=mb.ref_logprobs,
                                        entropy=ent, normaliser=normaliser)
            # Gradients are averaged over ranks (FSDP2 reduce-scatter, or _all_reduce_grads), while each
            # rank's loss is its part of a sum over the whole mini-batch: scale back up by world_size.
            (loss * self.world_size).backward()
            n = float(mb.loss_tokens)
            weight += n
            with torch.no_grad():
                acc[: len(MEAN_METRICS)] += torch.stack([metrics[k] for k in MEAN_METRICS]).double() * n
                acc[-2] += loss.detach().double()
                if n > 0:
                    acc[-1] = torch.maximum(acc[-1], metrics["train/is_ratio_max"].double())
        if not self.cfg.fsdp and self.world_size > 1:
            self._all_reduce_grads()
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        values = torch.cat([acc, grad_norm.detach().double().reshape(1)]).tolist()  # the update's one host sync
        grad_norm = values[-1]
        if self.nonfinite.allow_update(self.step, grad_norm):
            self.optimizer.step()
        sums = dict(zip(MEAN_METRICS, values[: len(MEAN_METRICS)], strict=True))
        return values[-3], grad_norm, sums | {"weight": weight, "train/is_ratio_max": values[-2]}

    def _rank_micro_batches(self, rows: list[TrainRow], row_ids: list[int]) -> list[MicroBatch]:
        """This rank's micro-batches of rows[row_ids], padded with dummy passes to the largest rank's count."""
        lengths = [row_length(r) for r in rows]
        vision = uses_padded_layout(rows, row_ids)
        padded = vision or self.layout == "padded"
        shards = shard_rows(row_ids, lengths, self.world_size)
        budget = self.cfg.micro_batch_max_tokens
        most = max(len(plan_micro_batches(s, lengths, budget, padded)) for s in shards)
        mbs = make_micro_batches(rows, shards[self.rank], budget, self.pad_id, padded)
        like = rows[row_ids[0]] if vision else None  # VL: padding passes run the vision tower too
        mbs += [dummy_micro_batch(self.pad_id, like, padded) for _ in range(most - len(mbs))]
        return [mb.to(self.device) for mb in mbs]

    def _normaliser(self, rows: list[TrainRow], row_ids: list[int]) -> int:
        """The loss denominator of a whole mini-batch (all ranks), see losses.aggregate."""
        mask = pad_2d([rows[i].loss_mask for i in row_ids], max((len(rows[i].loss_mask) for i in row_ids), default=0))
        return loss_normaliser(mask, self.algo.loss_agg)

    @torch.no_grad()
    def _fill_logprobs(self, mbs: list[MicroBatch]) -> None:
        """Before any update: proximal log-probs (several updates per step) and reference log-probs
        (kl_coef > 0).

        With one update per step the training pass itself runs on the pre-update weights, so its
        detached log-probs are the proximal ones (and what train/mismatch_kl compares with the
        rollout): no extra forward pass. With several updates, decoupled_ppo needs the proximal
        log-probs fixed before the first update, and ppo takes them for train/mismatch_kl."""
        updates = self.cfg.ppo_epochs * self.cfg.mini_batches
        if updates > 1:
            self.model.eval()
            for mb in mbs:
                mb.proximal_logprobs, _ = token_logprobs(self.model, mb, self.temperature, "none", self.autocast)
        if self.ref_model is not None:
            for mb in mbs:
                mb.ref_logprobs, _ = token_logprobs(self.ref_model, mb, self.temperature, "none", self.autocast)

    @torch.no_grad()
    def compute_logprobs(self, rows: list[TrainRow]) -> list[list[float]]:
        """Log-prob of every response token of every row under the current weights (all ranks
        must call this; each computes its share and every rank returns the whole list)."""
        self.model.eval()
        local: dict[int, list[float]] = {}
        for mb in self._rank_micro_batches(rows, list(range(len(rows)))):
            logp, _ = token_logprobs(self.model, mb, self.temperature, "none", self.autocast)
            for j, i in enumerate(mb.row_ids):
                local[i] = logp[j, : len(rows[i].response_ids)].tolist()
        if self.world_size > 1:
            parts: list[dict[int, list[float]]] = [{} for _ in range(self.world_size)]
            dist.all_gather_object(parts, local)
            local = {i: v for part in parts for i, v in part.items()}
        return [local[i] for i in range(len(rows))]

    def _all_reduce(self, values: list[float], op: dist.ReduceOp) -> list[float]:
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def _all_reduce_grads(self) -> None:
        """Replicated mode: average gradients over ranks (what FSDP2 does in its reduce-scatter)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world_size)

    # ---- weights out -------------------------------------------------------------------------

    def tensor_metas(self) -> list[TensorMeta]:
        """What iter_sync_tensors will yield, in order (no communication)."""
        dtype = self.model_cfg.dtype
        return [TensorMeta(name=n, dtype=dtype, shape=list(p.shape))
                for n, p in self.model.named_parameters() if p.requires_grad]

    def iter_sync_tensors(self, timer: list[float] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Full trainable tensors in HF names and the engine's dtype, on this worker's device. Every
        rank must exhaust it (FSDP2 gathers); only rank 0 yields anything."""
        return full_tensors(self.model, DTYPES[self.model_cfg.dtype], self.rank, include_frozen=False, timer=timer)

    def init_weight_sender(self, backend: str, master_address: str, master_port: int, world_size: int,
                           timeout_s: float, servers: list | None = None) -> None:
        """Rank 0 joins the transfer group with the engines; other ranks only help gather.
        ipc: no group; `servers` (RolloutServer handles) are what rank 0 loads each bucket into."""
        if self.rank == 0:
            from verl_async.sync.trainer_side import WeightSender

            self._sender = WeightSender(backend, master_address, master_port, world_size, timeout_s, engines=servers)

    def send_weights(self, bucket_bytes: int) -> dict[str, float]:
        """Gather the full weights (all ranks) and send them (rank 0) to the engines."""
        timer = [0.0]
        stats: dict[str, float] = {}
        if self.rank == 0:
            if self._sender is None:
                raise RuntimeError("send_weights before init_weight_sender: initialise the transfer group first.")
            stats = dict(self._sender.send(self.iter_sync_tensors(timer), bucket_bytes) or {})
        else:
            for _ in self.iter_sync_tensors(timer):
                pass
        return {"sync/gather_s": timer[0], **stats}

    # ---- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, path: str, extra_state: dict[str, Any]) -> None:
        state = {"scheduler": self.scheduler.state_dict(), "step": self.step, "policy_version": self.policy_version,
                 "world_size": self.world_size, "extra_state": extra_state}
        checkpoint.save_checkpoint(path, self.model, self.optimizer, state, self.rank)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Restore everything save_checkpoint wrote; return the pipeline's extra_state."""
        state = checkpoint.load_checkpoint(path, self.model, self.optimizer, self.rank)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.policy_version = state["step"], state["policy_version"]
        logger.info("rank %d resumed from %s at step %d", self.rank, path, self.step)
        return state["extra_state"]

    def export_hf(self, path: str) -> None:
        """Write an HF folder (weights in model.dtype) that vLLM and transformers can load."""
        dtype = DTYPES[self.model_cfg.dtype]
        tensors = {n: t.cpu() for n, t in full_tensors(self.model, dtype, self.rank, include_frozen=True)}
        if self.rank == 0:
            checkpoint.write_hf_folder(path, self.model_path, tensors, self.model_cfg.dtype)
        dist.barrier()

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
