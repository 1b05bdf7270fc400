"""The rollouter (a Ray actor; plain class here): prompts -> scored groups -> sample queue.

It runs one producer loop: take a prompt, expand it into `rollout.n` requests on one server
(prefix caching) or, with `data.env`, into `rollout.n` multi-turn episodes (rollout/multi_turn.py),
score the finished samples off the event loop, drop zero-variance groups
(dynamic sampling, counted), and put the group into the queue. Admission control
(pipeline/staleness.py) decides when a new group may start.
"""

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field

from verl_async.algorithms.advantages import is_zero_variance
from verl_async.config import AlgorithmConfig, DataConfig, PipelineConfig, RolloutConfig
from verl_async.data.prompts import PromptEncoder
from verl_async.data.rows import LoadReport
from verl_async.data.source import DataPosition, make_source
from verl_async.data.vision import ImageError
from verl_async.pipeline.staleness import admission_capacity, committed_groups
from verl_async.rewards import resolve_reward
from verl_async.rollout.sampling import PromptTooLongError
from verl_async.types import FinishReason, Generation, Group, PromptRow, Sample

logger = logging.getLogger(__name__)
QUEUE_POLL_S = 5.0  # how often a delivery waiting for room in the queue checks whether the run stopped


@dataclass
class RolloutCounts:
    """The rollouter's side of the ledger (monotone)."""

    read: int = 0
    rejected: int = 0
    filtered: int = 0
    failed: int = 0
    delivered: int = 0
    in_flight: int = 0


@dataclass
class _Window:
    """Per-report accumulators, reset by `pop_metrics`."""

    rewards: list[float] = field(default_factory=list)
    response_lens: list[int] = field(default_factory=list)
    tokens: int = 0
    idle_s: float = 0.0
    started: float = field(default_factory=time.monotonic)


class Rollouter:
    def __init__(self, servers: list, server_infos: list, model_path: str, rollout: RolloutConfig,
                 data: DataConfig, pipeline: PipelineConfig, algorithm: AlgorithmConfig, queue,
                 engine_version: int = 0, position: DataPosition | None = None,
                 pending_rows: list[PromptRow] | None = None, restored_groups: int = 0):
        from verl_async.rollout.manager import RolloutManager

        self.manager = RolloutManager(servers, server_infos, rollout)
        # VL models: prompts are built by the model's processor, its outputs travel with the samples
        self.encoder = PromptEncoder.from_model(model_path, data.max_images_per_prompt)
        self.tokenizer = self.encoder.tokenizer
        self.rollout, self.data, self.pipeline, self.algorithm = rollout, data, pipeline, algorithm
        self.load_report = LoadReport()  # rows skipped at load (e.g. a missing image), reported as data/rows_skipped
        self.source = make_source(data, position, self.load_report)
        self.image_errors = 0  # rows whose images failed when their prompt was built (counted as rejected)
        self.reward_fn = resolve_reward(data.reward_fn)
        self.episodes = None  # with data.env: the multi-turn workflow that runs each sample as an episode
        if data.env.enabled:
            from verl_async.envs import resolve_env
            from verl_async.rollout.multi_turn import MultiTurnWorkflow

            self.episodes = MultiTurnWorkflow(data.env, resolve_env(data.env), self.manager, self.tokenizer,
                                              rollout.response_length)
        self.queue = queue
        self.engine_version = engine_version
        self.resumed_step = engine_version  # a fresh run starts at 0; a resumed one at its checkpoint's step
        self.stale_dropped = 0
        # groups put back into the queue from a checkpoint were read and delivered before it
        self.counts = RolloutCounts(read=restored_groups, delivered=restored_groups)
        self.pending_rows = list(pending_rows or [])  # in flight at the last checkpoint: regenerated first
        self._inflight_rows: dict[str, PromptRow] = {}
        self._window = _Window()
        self._idle_since: float | None = time.monotonic()
        self._wake = asyncio.Event()
        self._delivery = asyncio.Lock()  # a checkpoint snapshot sees each group exactly once
        self._task: asyncio.Task | None = None
        self._error: BaseException | None = None
        self._stopped = False

    # ---- control (called by the driver) ----
    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._produce())

    async def on_step(self, engine_version: int) -> None:
        """Tell the rollouter the engines' policy_version (after a train step and its sync, if any)."""
        self.engine_version = engine_version
        self._wake.set()

    async def on_stale_dropped(self, stale_dropped_total: int) -> None:
        """Tell the rollouter how many groups the queue dropped as stale: their admission slots are
        free at once (a trainer short of groups would otherwise wait for a step that needs them)."""
        self.stale_dropped = stale_dropped_total
        self._wake.set()

    async def stop(self) -> RolloutCounts:
        """Stop producing; the groups still in flight are reported as such, then aborted."""
        if self._task:
            self._task.cancel()
        final = dataclasses.replace(self.counts)
        self._stopped = True
        await self.manager.abort_all()
        return final

    def health(self) -> str | None:
        """None while healthy, else the error that stopped the producer loop."""
        return None if self._error is None else repr(self._error)

    # ---- the producer loop ----
    def _capacity(self) -> int:
        c = self.counts
        committed = committed_groups(self.resumed_step, self.pipeline.batch_groups, c.read,
                                     freed=c.rejected + c.filtered + c.failed + self.stale_dropped)
        cap = admission_capacity(self.engine_version, committed, self.pipeline.batch_groups, self.pipeline.max_staleness)
        limit = self.pipeline.max_inflight_groups or self.pipeline.batch_groups * (self.pipeline.max_staleness + 1)
        return min(cap, limit - self.counts.in_flight)

    async def _produce(self) -> None:
        try:
            while True:
                while self._capacity() <= 0:
                    self._wake.clear()
                    await self._wake.wait()
                row = self.pending_rows.pop(0) if self.pending_rows else self.source.next()
                self.counts.read += 1
                self.counts.in_flight += 1
                group_id = f"{row.prompt_id}#{self.counts.read}"
                self._inflight_rows[group_id] = row
                asyncio.get_running_loop().create_task(self._rollout_group(row, group_id))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # actor boundary: remember, log, and let health() report it
            self._error = e
            logger.exception("rollouter producer loop failed")
            raise

    async def _rollout_group(self, row: PromptRow, group_id: str) -> None:
        self._mark_busy()
        try:
            prompt, mm_inputs = self.encoder.encode(row)
            budget = row.extra_info.get("max_tokens")  # a row may carry its own budget (still clamped)
            stops = self.encoder.stop_token_ids
            episodes = None
            if self.episodes is not None:
                episodes = await self.episodes.run_group(row, group_id, prompt, self.rollout.n)
                gens = [e.generation for e in episodes]
            else:
                gens = await asyncio.gather(*[
                    self.manager.generate(row.prompt_id, f"{group_id}/{i}", prompt, max_tokens=budget,
                                          sampling={"stop_token_ids": stops} if stops else None, affinity_key=group_id)
                    for i in range(self.rollout.n)])
            await self._deliver(row, group_id, gens, mm_inputs, episodes)
        except PromptTooLongError:
            self.counts.rejected += 1  # counted and logged by the manager with the prompt id
        except ImageError as e:  # a missing or unreadable image: skipped and counted, never sent image-less
            self.counts.rejected += 1
            self.image_errors += 1
            logger.warning("prompt %s skipped: %s", row.prompt_id, e)
        except Exception as e:  # one bad group must not stop the rollout: count it, log it
            if self._stopped:
                return
            self.counts.failed += 1
            logger.exception("group %s failed: %s", group_id, e)
        finally:
            self.counts.in_flight -= 1
            self._inflight_rows.pop(group_id, None)
            self._mark_idle_if_empty()
            self._wake.set()

    async def _deliver(self, row: PromptRow, group_id: str, gens: list[Generation], mm_inputs: dict,
                       episodes: list | None = None) -> None:
        """Score and queue a group. Multi-turn `episodes`: data.reward_fn scores the final answer of an
        episode the environment ended (none for a truncated one), plus the environment's rewards."""
        if self._stopped:
            return  # aborted by stop(): reported as in flight at the end
        if any(g.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH) for g in gens):
            self.counts.failed += 1
            logger.warning("group %s has aborted/failed requests: not trained on", group_id)
            return
        if episodes is None:
            texts = [self.tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in gens]
            extra = [0.0] * len(gens)
        else:
            texts, extra = [e.answer for e in episodes], [e.env_reward for e in episodes]
        rewards = await asyncio.to_thread(
            lambda: [(float(self.reward_fn(t, row.ground_truth, row.extra_info)) if t is not None else 0.0) + x
                     for t, x in zip(texts, extra, strict=True)])
        self._window.rewards += rewards
        self._window.response_lens += [len(g.response_ids) for g in gens]
        self._window.tokens += sum(g.num_model_tokens for g in gens)
        if self.algorithm.drop_zero_variance_groups and is_zero_variance(rewards):
            self.counts.filtered += 1
            return
        samples = [Sample(row.prompt_id, group_id, g, r, multi_modal_data=mm_inputs or None)
                   for g, r in zip(gens, rewards, strict=True)]
        # Wait for room outside the delivery lock: a checkpoint must never wait behind a full queue
        # (the trainer that would drain it is the one waiting for the checkpoint). The rollouter is
        # the queue's only producer, so the room is still there when the lock is taken.
        while not await self.queue.wait_for_room.remote(QUEUE_POLL_S):
            if self._stopped:
                return  # reported as in flight at the end
        async with self._delivery:
            await self.queue.put.remote(Group(row.prompt_id, samples))
            self.counts.delivered += 1
            self._inflight_rows.pop(group_id, None)

    # ---- idle accounting and metrics ----
    def _mark_busy(self) -> None:
        if self._idle_since is not None:
            self._window.idle_s += time.monotonic() - self._idle_since
            self._idle_since = None

    def _mark_idle_if_empty(self) -> None:
        if self.counts.in_flight == 0 and self._idle_since is None:
            self._idle_since = time.monotonic()

    async def pop_metrics(self) -> dict[str, float]:
        w, now = self._window, time.monotonic()
        idle = w.idle_s + (now - self._idle_since if self._idle_since is not None else 0.0)
        elapsed = max(now - w.started, 1e-9)
        out = {
            "rollout/reward_mean": sum(w.rewards) / len(w.rewards) if w.rewards else float("nan"),
            "rollout/response_len_mean": sum(w.response_lens) / len(w.response_lens) if w.response_lens else float("nan"),
            "rollout/tokens": float(w.tokens),
            "perf/rollout_tokens_per_s": w.tokens / elapsed,
            "perf/rollout_idle_ratio": min(1.0, idle / elapsed),
            "rollout/groups_filtered": float(self.counts.filtered),
            "rollout/groups_failed": float(self.counts.failed),
            "rollout/in_flight_groups": float(self.counts.in_flight),
            "rollout/image_errors": float(self.image_errors),
            "data/rows_skipped": float(sum(self.load_report.skipped.values())),
        }
        out |= await self.manager.stats()
        if self.episodes is not None:
            out |= self.episodes.pop_metrics()
        self._window = _Window()
        if self._idle_since is not None:
            self._idle_since = now
        return out

    async def checkpoint_state(self) -> dict:
        """Data position, rows still in flight (regenerated on resume) and the queued groups,
        taken together under the delivery lock so no group is both or neither."""
        async with self._delivery:
            queued = await self.queue.snapshot.remote()
            pending = list(self.pending_rows) + list(self._inflight_rows.values())
            return {"position": self.source.position, "pending_rows": pending, "queued_groups": queued}
