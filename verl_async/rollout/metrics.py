"""Engine metrics of one rollout server, read through a vLLM stat logger, as `rollout/` names.

vLLM calls `EngineStatLogger.record` after every engine step it has processed (same
interface on 0.26 and 0.32). Counters here are monotone and never negative; derived
values are checked against their invariant and a bad sample is dropped with one warning.
Preemptions caused by clear_cache pauses (vLLM counts one per running request it resets)
are reported apart, so `rollout/preemptions` keeps meaning memory pressure.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class EngineMetrics:
    """Counters and gauges of one engine. All counters only go up."""

    def __init__(self):
        self.counters: dict[str, float] = {
            "rollout/preemptions": 0.0,  # memory-pressure preemptions (engine total minus sync resets)
            "rollout/preemptions_from_sync": 0.0,  # requests reset by clear_cache pauses
            "rollout/preemptions_engine_total": 0.0,  # vLLM's own count, both kinds
            "rollout/prompt_tokens": 0.0,
            "rollout/generation_tokens": 0.0,
            "rollout/cached_prompt_tokens": 0.0,
            "rollout/invariant_violations": 0.0,
            "rollout/metrics_errors": 0.0,
        }
        self.gauges: dict[str, float] = {
            "rollout/kv_cache_usage": 0.0,
            "rollout/kv_cache_usage_peak": 0.0,  # highest usage since the last snapshot()
            "rollout/num_running": 0.0,
            "rollout/num_waiting": 0.0,
        }
        self._warned: set[str] = set()

    def inc(self, name: str, value: float = 1.0) -> None:
        if value < 0:
            self.violation("negative_increment", f"{name} += {value}")
            return
        self.counters[name] = self.counters.get(name, 0.0) + value

    def violation(self, kind: str, details: str) -> None:
        """Count an invariant violation; warn once per kind with the details."""
        self.counters["rollout/invariant_violations"] += 1
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning("metric invariant violated (%s): %s; sample left out of the metric "
                           "(further violations of this kind are only counted)", kind, details)

    def record(self, scheduler_stats, iteration_stats) -> None:
        """Fold one processed engine step into the counters (vLLM SchedulerStats / IterationStats)."""
        if scheduler_stats is not None:
            usage = float(scheduler_stats.kv_cache_usage)
            if 0.0 <= usage <= 1.0:
                self.gauges["rollout/kv_cache_usage"] = usage
                self.gauges["rollout/kv_cache_usage_peak"] = max(self.gauges["rollout/kv_cache_usage_peak"], usage)
            else:
                self.violation("kv_cache_usage", f"kv_cache_usage={usage} outside [0, 1]")
            self.gauges["rollout/num_running"] = float(max(0, scheduler_stats.num_running_reqs))
            self.gauges["rollout/num_waiting"] = float(max(0, scheduler_stats.num_waiting_reqs))
        if iteration_stats is None:
            return
        self.inc("rollout/generation_tokens", iteration_stats.num_generation_tokens)
        self.inc("rollout/preemptions_engine_total", iteration_stats.num_preempted_reqs)
        self._record_prompt_tokens(iteration_stats.prompt_token_stats)
        for finished in iteration_stats.finished_requests:
            if not finished.num_prompt_tokens >= finished.num_cached_tokens >= 0:
                self.violation("finished_request_cached_tokens",
                               f"request {finished.request_id}: num_prompt_tokens={finished.num_prompt_tokens}, "
                               f"num_cached_tokens={finished.num_cached_tokens}")
        self._update_preemptions()

    def _record_prompt_tokens(self, pts) -> None:
        # vLLM PromptTokenStats: total >= cached_tokens >= external_kv_transfer >= 0 must hold.
        if not pts.total >= pts.cached_tokens >= pts.external_kv_transfer >= 0 or pts.computed < 0:
            self.violation("prompt_token_stats",
                           f"total={pts.total}, cached={pts.cached_tokens}, "
                           f"external={pts.external_kv_transfer}, computed={pts.computed}")
            return
        self.inc("rollout/prompt_tokens", pts.total)
        self.inc("rollout/cached_prompt_tokens", pts.cached_tokens)

    def add_sync_preemptions(self, n: int) -> None:
        """Requests a clear_cache pause reset (vLLM counts each one as a preemption)."""
        self.inc("rollout/preemptions_from_sync", max(0, n))
        self._update_preemptions()

    def _update_preemptions(self) -> None:
        # The reset events reach us after the reset itself: keep the difference monotone.
        memory = (self.counters["rollout/preemptions_engine_total"]
                  - self.counters["rollout/preemptions_from_sync"])
        self.counters["rollout/preemptions"] = max(self.counters["rollout/preemptions"], memory)

    def values(self) -> dict[str, float]:
        return {**self.counters, **self.gauges}

    def snapshot(self) -> dict[str, float]:
        """All metrics; then restarts the peak gauge from the current usage."""
        out = self.values()
        self.gauges["rollout/kv_cache_usage_peak"] = self.gauges["rollout/kv_cache_usage"]
        return out


@dataclass
class _Reset:
    after: float  # engine time of the resume before the pause
    resumed_at: float  # engine time of the resume after it
    running: int  # requests running at the pause (from the last step inside the window)


class SyncResets:
    """Counts the requests clear_cache pauses reset (vLLM counts each as a preemption).

    A keep pause with clear_cache resets every request running at the pause: the running
    count of the last engine step before it. The frontend may process that step after the
    resume, so a reset stays pending until a step after the resume is seen. Steps are placed
    in time by `latest_ts`, the newest engine timestamp of any request's last token (steps
    are processed in order, so it grows with each step that produced a token).
    """

    def __init__(self):
        self._pending: list[_Reset] = []
        self._prev_resume = 0.0
        self._step_ts = 0.0

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def on_resume(self, resumed_at: float, reset: bool, latest_ts: float, num_running: int) -> None:
        """At a resume; `reset`: the pause cleared the cache in keep mode. `num_running` is the
        engine's latest reported running count, valid for the pause if latest_ts is after the
        previous resume (else no step ran in between and nothing was running)."""
        if reset:
            running = num_running if latest_ts > self._prev_resume else 0
            self._pending.append(_Reset(self._prev_resume, resumed_at, running))
        self._prev_resume = resumed_at
        self._step_ts = max(self._step_ts, latest_ts)

    def on_step(self, latest_ts: float, num_running: int | None) -> int:
        """After the frontend processed a step; returns the resets now known to be complete."""
        newer = latest_ts > self._step_ts
        self._step_ts = max(self._step_ts, latest_ts)
        settled, keep = 0, []
        for r in self._pending:
            if latest_ts > r.resumed_at:
                settled += r.running
            else:
                if newer and latest_ts > r.after and num_running is not None:
                    r.running = num_running  # a step inside the window processed late: the truth
                keep.append(r)
        self._pending = keep
        return settled

    def flush(self) -> int:
        """Settle everything pending (e.g. at shutdown)."""
        settled = sum(r.running for r in self._pending)
        self._pending = []
        return settled


def stat_logger_factory(on_step: Callable[[object, object], None]):
    """A vLLM per-engine stat-logger factory whose loggers call `on_step(scheduler_stats,
    iteration_stats)` after every processed engine step. Pass it in a list to
    AsyncLLM.from_engine_args(stat_loggers=[...])."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class EngineStatLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.engine_index = engine_index
            self._failed = False

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            try:
                on_step(scheduler_stats, iteration_stats)
            except Exception:  # an exception here would kill vLLM's output handler (and the engine)
                if not self._failed:
                    logger.exception("rollout stat logger failed; generation goes on, metrics may be off")
                self._failed = True

        def log_engine_initialized(self):
            pass

    return EngineStatLogger


def serve_prometheus(port: int, snapshot: Callable[[], dict[str, float]]) -> None:
    """Serve vLLM's own metrics (`vllm:*`) and ours (`verl_async_rollout_*`) on `port`."""
    from prometheus_client import REGISTRY, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class _Collector:
        def collect(self):
            values = snapshot()
            for name, value in values.items():
                flat = "verl_async_" + name.replace("/", "_")
                if name.endswith(("kv_cache_usage", "kv_cache_usage_peak", "num_running", "num_waiting",
                                  "policy_version", "outstanding")):
                    yield GaugeMetricFamily(flat, name, value=value)
                else:
                    yield CounterMetricFamily(flat, name, value=value)

    REGISTRY.register(_Collector())
    start_http_server(port)
    logger.info("Prometheus metrics on port %d", port)
