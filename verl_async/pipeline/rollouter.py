"""The rollouter (a Ray actor; plain class here): prompts -> scored groups -> sample queue.

It runs one producer loop: take a prompt, expand it into `rollout.n` requests on one server
(prefix caching) or, with `data.env`, into `rollout.n` multi-turn episodes (rollout/multi_turn.py),
score the finished samples off the event loop, drop zero-variance groups
(dynamic sampling, counted), and put the group into the queue. Admission control
(pipeline/staleness.py) decides when a new group may start. A group whose server died is
requeued (its prompt goes first in line); a run of unusable groups ends the run with its cause
(pipeline/starvation.py).
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
from verl_async.pipeline.starvation import StarvationError, StarvationWatch
from verl_async.rewards import resolve_reward
from verl_async.rewards.scoring import GroupScores, score_group
from verl_async.rollout.manager import ServerLostError
from verl_async.rollout.sampling import PromptTooLongError
from verl_async.types import FinishReason, Generation, Group, PromptRow, Sample

logger = logging.getLogger(__name__)
QUEUE_POLL_S = 5.0  # how often a delivery waiting for room in the queue checks whether the run stopped
LOGGED_PER_KIND = 5  # reward errors / too-long prompts logged one by one; after that only counted


@dataclass
class RolloutCounts:
    """The rollouter's side of the ledger (monotone)."""

    read: int = 0
    rejected: int = 0
    filtered: int = 0
    failed: int = 0
    delivered: int = 0
    in_flight: int = 0
    requeued: int = 0  # group attempts whose server died: the prompt was read again


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
        self.prompts_too_long = 0  # prompts over data.max_prompt_length (counted as rejected)
        self.reward_errors = 0  # samples whose reward raised or was NaN/inf (see data.reward_error)
        self.watch = StarvationWatch(pipeline.max_unusable_groups_in_a_row)
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
        """Stop producing; the groups still in flight are reported as such, then aborted. The counts are
        read under the delivery lock: a group whose put into the queue is under way is counted
        delivered (and queued), never both in flight and queued; none is delivered after."""
        self._stopped = True
        if self._task:
            self._task.cancel()
        async with self._delivery:
            final = dataclasses.replace(self.counts)
        await self.manager.abort_all()
        return final

    def health(self) -> str | None:
        """None while healthy, else the error that stopped the producer loop."""
        return None if self._error is None else f"{type(self._error).__name__}: {self._error}"

    def progress(self) -> dict[str, int]:
        """The counts so far (for a trainer that waits long for a batch to say why)."""
        return {**dataclasses.asdict(self.counts), "reward_errors": self.reward_errors,
                "prompts_too_long": self.prompts_too_long, "servers_live": self.manager.num_live}

    # ---- the producer loop ----
    def _capacity(self) -> int:
        c = self.counts
        committed = committed_groups(self.resumed_step, self.pipeline.batch_groups, c.read,
                                     freed=c.rejected + c.filtered + c.failed + c.requeued + self.stale_dropped)
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
            if not self._fits_prompt_length(row, len(prompt.prompt_ids)):
                return
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
            self._unusable("rejected", row)  # counted and logged by the manager with the prompt id
        except ImageError as e:  # a missing or unreadable image: skipped and counted, never sent image-less
            self.image_errors += 1
            self._unusable("rejected", row)
            logger.warning("prompt %s skipped: %s", row.prompt_id, e)
        except ServerLostError as e:  # its server died: the prompt goes back to the front of the line
            if not self._stopped:
                self.counts.requeued += 1
                self.pending_rows.insert(0, row)
                logger.warning("group %s requeued: %s", group_id, e)
        except Exception as e:  # one bad group must not stop the rollout: count it, log it
            if self._stopped:
                return
            self._unusable("failed", row)
            logger.exception("group %s failed: %s", group_id, e)
        finally:
            self.counts.in_flight -= 1
            self._inflight_rows.pop(group_id, None)
            self._mark_idle_if_empty()
            self._wake.set()

    def _fits_prompt_length(self, row: PromptRow, prompt_len: int) -> bool:
        """data.max_prompt_length, on the real length (vision tokens included); over it: rejected, counted."""
        if prompt_len <= self.data.max_prompt_length:
            return True
        self.prompts_too_long += 1
        self._unusable("rejected", row)
        if self.prompts_too_long <= LOGGED_PER_KIND:
            logger.warning("prompt %s rejected: %d tokens > data.max_prompt_length=%d%s", row.prompt_id, prompt_len,
                           self.data.max_prompt_length, " (further ones are only counted: data/prompts_too_long)"
                           if self.prompts_too_long == LOGGED_PER_KIND else "")
        return False

    def _unusable(self, kind: str, row: PromptRow, reward: float | None = None) -> None:
        """Count a group that will not be trained (its ledger entry), and stop the run once too many
        in a row were unusable: health() then reports why."""
        if kind == "filtered":
            self.counts.filtered += 1
        elif kind == "rejected":
            self.counts.rejected += 1
        else:  # failed requests, or no sample left with a valid reward
            self.counts.failed += 1
        self.watch.unusable(kind, reward=reward, empty_ground_truth=not row.ground_truth)
        message = self.watch.verdict()
        if message is not None and self._error is None:
            self._error = StarvationError(message)
            logger.error("rollout stopped: %s", message)
            if self._task is not None:
                self._task.cancel()

    def _count_reward_errors(self, row: PromptRow, scores: GroupScores) -> None:
        if not scores.errors:
            return
        self.reward_errors += len(scores.errors)
        if self.reward_errors - len(scores.errors) < LOGGED_PER_KIND:
            logger.warning("reward error on prompt %s (%d of %d samples, policy data.reward_error=%s): %s",
                           row.prompt_id, len(scores.errors), len(scores.rewards), self.data.reward_error,
                           scores.errors[0])

    async def _deliver(self, row: PromptRow, group_id: str, gens: list[Generation], mm_inputs: dict,
                       episodes: list | None = None) -> None:
        """Score and queue a group. Multi-turn `episodes`: data.reward_fn scores the final answer of an
        episode the environment ended (none for a truncated one), plus the environment's rewards."""
        if self._stopped:
            return  # aborted by stop(): reported as in flight at the end
        if any(g.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH) for g in gens):
            self._unusable("failed", row)
            logger.warning("group %s has aborted/failed requests: not trained on", group_id)
            return
        if episodes is None:
            texts = [self.tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in gens]
            extra = [0.0] * len(gens)
        else:  # an episode the environment did not end has no answer to score (None: 0 + its env rewards)
            texts, extra = [e.answer for e in episodes], [e.env_reward for e in episodes]
        scores = await asyncio.to_thread(score_group, self.reward_fn, texts, row.ground_truth, row.extra_info,
                                         self.data.reward_error)
        self._count_reward_errors(row, scores)
        kept = [(g, r + x) for g, r, x in zip(gens, scores.rewards, extra, strict=True) if r is not None]
        self._window.rewards += [r for _, r in kept]
        self._window.response_lens += [len(g.response_ids) for g in gens]
        self._window.tokens += sum(g.num_model_tokens for g in gens)
        if not kept:
            self._unusable("reward_errors", row)
            return
        if self.algorithm.drop_zero_variance_groups and is_zero_variance([r for _, r in kept]):
            self._unusable("reward_errors" if scores.errors else "filtered", row, reward=kept[0][1])
            return
        samples = [Sample(row.prompt_id, group_id, g, r, multi_modal_data=mm_inputs or None) for g, r in kept]
        # Wait for room outside the delivery lock: a checkpoint must never wait behind a full queue
        # (the trainer that would drain it is the one waiting for the checkpoint). The rollouter is
        # the queue's only producer, so the room is still there when the lock is taken.
        while not await self.queue.wait_for_room.remote(QUEUE_POLL_S):
            if self._stopped:
                return  # reported as in flight at the end
        async with self._delivery:
            if self._stopped:
                return  # stop() has read the counts: reported as in flight at the end
            await self.queue.put.remote(Group(row.prompt_id, samples))
            self.counts.delivered += 1
            self._inflight_rows.pop(group_id, None)
        self.watch.usable()

    # ---- server membership (the supervisor in the driver calls these) ----
    async def lost_servers(self) -> list[int]:
        """Servers found dead by a failed request, not yet removed by the supervisor."""
        return self.manager.lost_servers()

    async def remove_server(self, index: int) -> None:
        self.manager.remove_server(index)

    async def add_server(self, index: int, server, info) -> None:
        """A replacement that already holds the current weights: route to it again."""
        self.manager.add_server(index, server, info)

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
            "rollout/reward_errors": float(self.reward_errors),
            "rollout/requeued": float(self.counts.requeued),
            "rollout/servers_live": float(self.manager.num_live),
            "data/prompts_too_long": float(self.prompts_too_long),
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
