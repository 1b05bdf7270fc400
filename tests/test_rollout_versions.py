"""Unit tests of per-token policy_version attribution (verl_async.rollout.versions): pure, no engine.

The fake stats object stands in for vLLM's live RequestStateStats, updated the way vLLM's
frontend does after each engine step (count and engine timestamp), then `on_batch` is called
as vLLM's stat logger would.
"""

from dataclasses import dataclass

from verl_async.rollout.versions import VersionTracker


@dataclass
class Stats:
    num_generation_tokens: int = 0
    last_token_ts: float = 0.0


def step(tracker, stats, ts, tokens=1):
    """One engine step processed by the frontend: the request got `tokens` tokens at engine time ts."""
    stats.num_generation_tokens += tokens
    stats.last_token_ts = ts
    tracker.on_batch()


def test_rollout_versions_no_update_keeps_version():
    t = VersionTracker(policy_version=3)
    t.add("a")
    s = Stats()
    t.set_stats("a", s)
    for ts in range(1, 6):
        step(t, s, ts)
    assert t.finish("a", 5, s.last_token_ts) == [3] * 5


def test_rollout_versions_cut_at_resume():
    t = VersionTracker()
    t.add("a")
    s = Stats()
    t.set_stats("a", s)
    for ts in (1, 2, 3):
        step(t, s, ts)
    t.on_resume(1, resumed_at=10.0, live_stats={})
    for ts in (11, 12):
        step(t, s, ts)
    assert t.finish("a", 5, s.last_token_ts) == [0, 0, 0, 1, 1]


def test_rollout_versions_frontend_lag_after_resume():
    # the frontend was still processing pre-pause steps when resume was sent
    t = VersionTracker()
    t.add("a")
    s = Stats()
    t.set_stats("a", s)
    step(t, s, 1)
    t.on_resume(1, resumed_at=10.0, live_stats={})
    step(t, s, 2)  # late pre-pause step
    step(t, s, 3)  # late pre-pause step
    step(t, s, 11)  # first post-resume step
    step(t, s, 12)
    assert t.finish("a", 5, s.last_token_ts) == [0, 0, 0, 1, 1]


def test_rollout_versions_stats_from_frontend_when_no_output_consumed_yet():
    # the request has tokens in vLLM's frontend but our stream has not seen an output yet
    t = VersionTracker()
    t.add("a")
    s = Stats(num_generation_tokens=4, last_token_ts=4.0)
    t.on_resume(1, resumed_at=10.0, live_stats={"a": s})
    step(t, s, 11, tokens=2)
    assert t.finish("a", 6, s.last_token_ts) == [0, 0, 0, 0, 1, 1]


def test_rollout_versions_request_not_yet_in_engine_gets_new_version():
    t = VersionTracker()
    t.add("a")  # added while paused, not yet known to vLLM's frontend
    t.on_resume(1, resumed_at=10.0, live_stats={})
    s = Stats()
    step(t, s, 11, tokens=3)
    assert t.finish("a", 3, s.last_token_ts) == [1, 1, 1]


def test_rollout_versions_request_finished_before_resume_keeps_old_version():
    # finished in vLLM's frontend (so absent from live_stats), our stream not yet done
    t = VersionTracker()
    t.add("a")
    t.on_resume(1, resumed_at=10.0, live_stats={})
    assert t.finish("a", 4, last_token_ts=5.0) == [0, 0, 0, 0]


def test_rollout_versions_two_updates_while_waiting():
    t = VersionTracker()
    t.add("a")
    s = Stats()
    t.set_stats("a", s)
    step(t, s, 1, tokens=2)
    t.on_resume(1, resumed_at=10.0, live_stats={})
    t.on_resume(2, resumed_at=20.0, live_stats={})  # the request was preempted: no tokens under v1
    step(t, s, 21, tokens=2)
    assert t.finish("a", 4, s.last_token_ts) == [0, 0, 2, 2]


def test_rollout_versions_many_requests_independent_cuts():
    t = VersionTracker()
    stats = {}
    for rid, n in (("a", 1), ("b", 3), ("c", 0)):
        t.add(rid)
        stats[rid] = Stats()
        t.set_stats(rid, stats[rid])
        if n:
            step(t, stats[rid], 1, tokens=n)
    t.on_resume(7, resumed_at=10.0, live_stats={})
    for s in stats.values():
        step(t, s, 11, tokens=2)
    assert t.finish("a", 3, 11) == [0, 7, 7]
    assert t.finish("b", 5, 11) == [0, 0, 0, 7, 7]
    assert t.finish("c", 2, 11) == [7, 7]
    assert len(t) == 0


def test_rollout_versions_same_version_is_no_cut():
    t = VersionTracker(policy_version=2)
    t.add("a")
    t.on_resume(2, resumed_at=10.0, live_stats={})
    assert t.cut_positions("a") == [(0, 2)]
