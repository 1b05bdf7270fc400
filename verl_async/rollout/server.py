"""One rollout server: a vLLM AsyncLLM engine, token-in / token-out, made a Ray actor by launch code.

Every request streams (DELTA) so the server sees each token arrive; every finished request is
checked for token conservation; every token carries the policy_version of the weights that
produced it, also across keep-mode pauses with a weight update inside (see versions.py).
"""

import logging
import os
import time
from dataclasses import dataclass

from verl_async.config import ModelConfig, RolloutConfig, SyncConfig
from verl_async.data.vision import collapse_image_slots
from verl_async.rollout.engine import engine_args
from verl_async.rollout.metrics import (
    EngineMetrics,
    SyncResets,
    serve_prometheus,
    stat_logger_factory,
)
from verl_async.rollout.sampling import PromptTooLongError, clamp_max_tokens, sampling_params
from verl_async.rollout.versions import VersionTracker
from verl_async.types import EnginePrompt, FinishReason, Generation

logger = logging.getLogger(__name__)

PAUSE_MODES = ("keep", "abort", "wait")
_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}
GAUGES = frozenset(EngineMetrics().gauges) | {"rollout/policy_version", "rollout/outstanding"}
"""The names in `stats()` that are levels, not counters (a replaced server's counters are kept, these not)."""


@dataclass
class ServerInfo:
    """What the controller needs to know about a started server."""

    server_index: int
    max_model_len: int  # the running engine's effective context window (read back, not configured)
    num_engine_workers: int  # tensor-parallel ranks: the engine side of the weight-transfer world
    vllm_version: str


class RolloutServer:
    """One AsyncLLM per instance (one per Ray actor: vLLM's Prometheus registry is per process)."""

    def __init__(self, server_index: int, model_path: str, model: ModelConfig, rollout: RolloutConfig,
                 sync: SyncConfig, device: str, max_images_per_prompt: int = 1):
        self.server_index = server_index
        self._max_images_per_prompt = max_images_per_prompt  # VL models: vLLM's limit_mm_per_prompt
        self._image_token_id: int | None = None  # VL models: <|image_pad|>, read from the engine's config
        self._model_path = model_path
        self._model = model
        self._rollout = rollout
        self._sync = sync
        self._device = device
        self._engine = None
        self._max_model_len = 0
        self._metrics = EngineMetrics()
        self._versions = VersionTracker(policy_version=0)
        self._pending_version: int | None = None  # set by a weight update, live at the next resume
        self._paused = False
        self._reset_at_resume = False
        self._sync_resets = SyncResets()
        self._live_stats: dict[str, object] = {}  # request id -> vLLM's live RequestStateStats
        self._counters: dict[str, float] = {
            "rollout/requests_finished": 0.0, "rollout/requests_aborted": 0.0,
            "rollout/token_conservation_errors": 0.0, "rollout/version_attribution_errors": 0.0,
            "rollout/version_checks": 0.0,  # requests whose versions vLLM (>= 0.32) confirmed
            "rollout/rejected_too_long": 0.0, "rollout/pauses": 0.0, "rollout/response_tokens": 0.0,
            "rollout/prompt_length_mismatches": 0.0,  # our prompt ids != vLLM's (e.g. vision tokens miscounted)
        }

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> ServerInfo:
        """Start the engine (blocks ~20-60 s on CPU); return what it actually runs with."""
        if self._device == "cpu":
            # AsyncLLM always runs its EngineCore in a child process; on CPU that process can host the
            # model worker too (vLLM's uniproc executor) instead of spawning a third process that imports
            # vLLM again: ~15 s less per engine start on 2 cores. An explicit user setting wins.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm
        from vllm.v1.engine.async_llm import AsyncLLM

        args = engine_args(self._model_path, self._model, self._rollout, self._sync, self._device,
                           max_images_per_prompt=self._max_images_per_prompt)
        self._engine = AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger_factory(self._on_engine_step)])
        self._frontend_stats()  # fail now, not at the first sync, if vLLM's frontend changed shape
        self._max_model_len = int(self._engine.model_config.max_model_len)
        self._image_token_id = getattr(self._engine.model_config.hf_config, "image_token_id", None)  # VL only
        await self._label_engine_weights(0)
        if self._rollout.metrics_port:
            serve_prometheus(self._rollout.metrics_port + self.server_index, self._values)
        info = ServerInfo(self.server_index, self._max_model_len, self._rollout.tensor_parallel_size,
                          vllm.__version__)
        logger.info("rollout server %d started: %s", self.server_index, info)
        return info

    async def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    async def health(self) -> bool:
        if self._engine is None:
            return False
        try:
            await self._engine.check_health()
        except Exception:  # health is a yes/no answer to the controller; the cause is logged
            logger.exception("rollout server %d is unhealthy", self.server_index)
            return False
        return True

    # ---- generation ------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: EnginePrompt, max_tokens: int | None = None,
                       sampling: dict | None = None) -> Generation:
        """Generate one response. `max_tokens` (or sampling["max_tokens"/"max_new_tokens"]) wins
        over rollout.response_length, clamped to the window; raises PromptTooLongError."""
        if self._engine is None:
            raise RuntimeError("RolloutServer.generate before start(): call start() first.")
        if request_id in self._live_stats:
            raise ValueError(f"request id {request_id!r} is already running on server {self.server_index}")
        sampling = dict(sampling or {})
        prompt_len = len(prompt.prompt_ids)
        try:
            budget = clamp_max_tokens(
                prompt_len, self._max_model_len, self._rollout.response_length,
                max_tokens=max_tokens if max_tokens is not None else sampling.get("max_tokens"),
                max_new_tokens=sampling.get("max_new_tokens"), prompt_id=request_id)
        except PromptTooLongError:
            self._counters["rollout/rejected_too_long"] += 1
            logger.warning("server %d rejected request %s: prompt of %d tokens, max_model_len %d",
                           self.server_index, request_id, prompt_len, self._max_model_len)
            raise
        if budget == 0:
            return self._generation(request_id, prompt, [], [], [], FinishReason.LENGTH)
        params = sampling_params(self._rollout, budget, sampling)
        engine_prompt = {"prompt_token_ids": list(prompt.prompt_ids)}
        if prompt.multi_modal_data:  # vLLM expands each image's single placeholder itself (checked below)
            engine_prompt = {"prompt_token_ids": collapse_image_slots(prompt.prompt_ids, self._image_token_id),
                             "multi_modal_data": prompt.multi_modal_data}

        tokens: list[int] = []
        logprobs: list[float] = []
        final = None
        self._versions.add(request_id)
        self._live_stats[request_id] = None
        try:
            async for out in self._engine.generate(engine_prompt, params, request_id):
                if self._live_stats[request_id] is None and out.metrics is not None:
                    self._live_stats[request_id] = out.metrics
                    self._versions.set_stats(request_id, out.metrics)
                completion = out.outputs[0]
                new_ids = list(completion.token_ids)
                tokens.extend(new_ids)
                logprobs.extend(_sampled_logprobs(new_ids, completion.logprobs))
                final = out
        finally:
            stats = self._live_stats.pop(request_id, None)
            versions = self._versions.finish(request_id, len(tokens),
                                             stats.last_token_ts if stats is not None else None)
        if final is None:
            raise RuntimeError(f"vLLM ended request {request_id} without any output")
        completion = final.outputs[0]
        reason = _FINISH_REASONS.get(completion.finish_reason, FinishReason.ERROR)
        self._check_conservation(request_id, budget, tokens, logprobs, final, reason)
        if final.prompt_token_ids and list(final.prompt_token_ids) != list(prompt.prompt_ids):
            self._counters["rollout/prompt_length_mismatches"] += 1
            logger.error("PROMPT MISMATCH on server %d, request %s: we have %d tokens, vLLM %d (or other ids); "
                         "clamping, the too-long check and the trainer used ours", self.server_index, request_id,
                         prompt_len, len(final.prompt_token_ids))
        self._check_versions(request_id, versions, completion)
        self._counters["rollout/requests_finished"] += 1
        self._counters["rollout/response_tokens"] += len(tokens)
        if reason == FinishReason.ABORT:
            self._counters["rollout/requests_aborted"] += 1
        cached = final.num_cached_tokens or 0
        if not prompt_len >= cached >= 0:
            self._metrics.violation("request_cached_tokens",
                                    f"request {request_id}: prompt_len={prompt_len}, num_cached_tokens={cached}")
            cached = 0
        preemptions = getattr(final.metrics, "num_preemptions", 0)  # per-request count: vLLM >= 0.32 only
        return self._generation(request_id, prompt, tokens, logprobs, versions, reason, preemptions, cached)

    def _generation(self, request_id, prompt, tokens, logprobs, versions, reason, preemptions=0, cached=0):
        return Generation(request_id=request_id, prompt_ids=list(prompt.prompt_ids), response_ids=tokens,
                          logprobs=logprobs, policy_versions=versions, finish_reason=reason,
                          num_preemptions=preemptions, num_cached_prompt_tokens=cached,
                          server_index=self.server_index)

    def _check_conservation(self, request_id, budget, tokens, logprobs, final, reason) -> None:
        """Every finished request carries exactly the tokens the engine says it generated."""
        engine_count = final.metrics.num_generation_tokens if final.metrics is not None else len(tokens)
        problems = []
        if len(tokens) != engine_count:
            problems.append(f"streamed {len(tokens)} tokens, engine generated {engine_count}")
        if len(logprobs) != len(tokens):
            problems.append(f"{len(logprobs)} logprobs for {len(tokens)} tokens")
        if reason == FinishReason.LENGTH and len(tokens) != budget:
            problems.append(f"finished by length with {len(tokens)} tokens, budget was {budget}")
        if len(tokens) > budget:
            problems.append(f"{len(tokens)} tokens exceed the budget of {budget}")
        if problems:
            self._counters["rollout/token_conservation_errors"] += 1
            logger.error("TOKEN CONSERVATION ERROR on server %d, request %s (finish %s): %s",
                         self.server_index, request_id, reason.value, "; ".join(problems))

    def _check_versions(self, request_id: str, versions: list[int], completion) -> None:
        """vLLM >= 0.32 labels tokens with weight versions itself: cross-check ours against it."""
        spans = getattr(completion, "weight_versions", None)
        if not spans:
            return
        engine_versions = [None] * len(versions)
        for span in spans:
            if not span.version.isdigit():
                return  # a label we did not set (e.g. vLLM's "default"): nothing to compare
            engine_versions[span.start:span.end] = [int(span.version)] * (span.end - span.start)
        self._counters["rollout/version_checks"] += 1
        if engine_versions != versions:
            self._counters["rollout/version_attribution_errors"] += 1
            logger.error("POLICY VERSION MISMATCH on server %d, request %s: ours %s, vLLM's %s",
                         self.server_index, request_id, _runs(versions), _runs(engine_versions))

    async def abort(self, request_id: str) -> None:
        """End a request now; its generate() returns with FinishReason.ABORT and the tokens so far."""
        await self._engine.abort(request_id)

    # ---- pause / resume --------------------------------------------------------------------

    async def pause(self, mode: str = "keep", clear_cache: bool = True) -> None:
        """keep: freeze running requests (they continue after resume); abort: end them; wait: drain."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r}: use one of {', '.join(PAUSE_MODES)}.")
        await self._engine.pause_generation(mode=mode, clear_cache=clear_cache)
        self._paused = True
        self._counters["rollout/pauses"] += 1
        self._reset_at_resume = self._reset_at_resume or (clear_cache and mode == "keep")

    async def resume(self) -> None:
        """Resume generation; a weight update done while paused becomes the tokens' version now."""
        resumed_at = time.monotonic()  # before resume is sent: every later engine step is newer
        if self._pending_version is not None:
            self._versions.on_resume(self._pending_version, resumed_at, self._frontend_stats())
            self._pending_version = None
        self._sync_resets.on_resume(resumed_at, self._reset_at_resume, self._latest_token_ts(),
                                    int(self._metrics.gauges["rollout/num_running"]))
        self._reset_at_resume = False
        await self._engine.resume_generation()
        self._paused = False

    # ---- weights ---------------------------------------------------------------------------

    async def init_weight_transfer(self, init_info: dict) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        await self._engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    async def start_weight_update(self) -> None:
        await self._engine.start_weight_update()

    async def update_weights(self, update_info: dict) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        await self._engine.update_weights(WeightTransferUpdateRequest(update_info=update_info))

    async def finish_weight_update(self, policy_version: int) -> None:
        """Finish the update; tokens produced after the next resume carry `policy_version`."""
        await self._engine.finish_weight_update()
        await self._label_engine_weights(policy_version)

    async def reload_weights(self, weights_path: str, policy_version: int) -> None:
        """Slow path: load new weights from an HF folder (same architecture) into the engine."""
        await self._engine.collective_rpc("reload_weights", kwargs={"weights_path": weights_path})
        await self._label_engine_weights(policy_version)

    async def _label_engine_weights(self, policy_version: int) -> None:
        if hasattr(self._engine, "update_weight_version"):  # vLLM >= 0.32: it labels tokens too
            await self._engine.update_weight_version(str(policy_version))
        if policy_version == self._versions.policy_version:
            return
        if self._paused:
            self._pending_version = policy_version
            return
        logger.warning("server %d: weights changed to version %d while generating; tokens of the "
                       "step in flight may be attributed to either version (update inside a pause)",
                       self.server_index, policy_version)
        self._versions.on_resume(policy_version, time.monotonic(), self._frontend_stats())

    # ---- metrics ---------------------------------------------------------------------------

    async def stats(self) -> dict[str, float]:
        out = self._metrics.snapshot()
        out.update(self._counters)
        out["rollout/policy_version"] = float(self._versions.policy_version)
        out["rollout/outstanding"] = float(len(self._live_stats))
        return out

    def _values(self) -> dict[str, float]:
        return {**self._metrics.values(), **self._counters}

    def _on_engine_step(self, scheduler_stats, iteration_stats) -> None:
        """Called by vLLM after it processed one engine step (see metrics.stat_logger_factory)."""
        if self._sync_resets.pending:  # first: this step may carry the reset requests' preemption events
            running = scheduler_stats.num_running_reqs if scheduler_stats is not None else None
            self._metrics.add_sync_preemptions(self._sync_resets.on_step(self._latest_token_ts(), running))
        self._metrics.record(scheduler_stats, iteration_stats)
        self._versions.on_batch()

    def _latest_token_ts(self) -> float:
        """Engine time of the newest step that produced a token for any live request."""
        stats = list(self._frontend_stats().values()) + [s for s in self._live_stats.values() if s is not None]
        return max((s.last_token_ts for s in stats), default=0.0)

    def _frontend_stats(self) -> dict[str, object]:
        """External request id -> the live RequestStateStats vLLM's frontend holds for it.

        vLLM internals (OutputProcessor.request_states; the same on 0.26 and 0.32): the only
        place that has the stats of a request whose first output we have not consumed yet.
        """
        states = self._engine.output_processor.request_states
        return {s.external_req_id: s.stats for s in states.values() if s.stats is not None}


def _sampled_logprobs(token_ids: list[int], logprobs) -> list[float]:
    if logprobs is None:
        return []
    return [float(position[token].logprob) for token, position in zip(token_ids, logprobs, strict=False)]


def _runs(values: list) -> str:
    """[0, 0, 0, 1, 1] -> '0x3 1x2' (compact logs)."""
    runs: list[list] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return " ".join(f"{v}x{n}" for v, n in runs)
