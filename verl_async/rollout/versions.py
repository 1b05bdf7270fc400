"""Per-token policy_version attribution for requests that live across keep-mode pauses.

vLLM 0.26 does not say which weights produced an output token, so the server works it
out from what the engine frontend already records per request (vLLM's RequestStateStats):
`num_generation_tokens`, and `last_token_ts`, the engine-core monotonic timestamp of the
last step that produced a token for the request. A weight update happens inside a pause,
and no token is produced while paused, so the cut for a request is the number of its
tokens produced by steps that ran before the resume. Steps before the resume carry
timestamps earlier than `resumed_at` (taken just before resume is sent), steps after it
later ones; the engine core runs on the same host, so both clocks are CLOCK_MONOTONIC.
The frontend may still be processing pre-pause steps after the resume was sent, so a cut
stays open and follows the request's count until its first post-resume step is seen
(`on_batch`, called after every processed engine step). Exact on vLLM 0.26 and 0.32.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

logger = logging.getLogger(__name__)


class TokenStats(Protocol):
    """The two fields of vLLM's RequestStateStats that attribution reads (live, mutable)."""

    num_generation_tokens: int
    last_token_ts: float


@dataclass
class _Cut:
    """Tokens from index `start` on were produced by weights `version`."""

    start: int
    version: int
    resumed_at: float
    stats: TokenStats | None  # None: unknown at resume time (not yet added, or already done)
    open: bool = True


@dataclass
class _Track:
    cuts: list[_Cut] = field(default_factory=list)
    stats: TokenStats | None = None


class VersionTracker:
    """Holds the current policy_version and the per-request cuts; see the module docstring."""

    def __init__(self, policy_version: int = 0):
        self.policy_version = policy_version
        self._tracks: dict[str, _Track] = {}
        self._open: list[_Cut] = []

    def add(self, request_id: str) -> None:
        """Start tracking a request: its tokens carry the current version until a cut."""
        track = _Track()
        track.cuts.append(_Cut(0, self.policy_version, 0.0, None, open=False))
        self._tracks[request_id] = track

    def set_stats(self, request_id: str, stats: TokenStats | None) -> None:
        """Give the tracker a request's live stats object (from its first RequestOutput)."""
        track = self._tracks.get(request_id)
        if track is not None and stats is not None:
            track.stats = stats

    def on_resume(self, policy_version: int, resumed_at: float,
                  live_stats: Mapping[str, TokenStats]) -> None:
        """New weights `policy_version` go live at engine time `resumed_at`.

        `live_stats` maps request ids to the stats objects the engine frontend holds for
        unfinished requests; call this just before the engine is resumed.
        """
        if policy_version == self.policy_version:
            return
        self.policy_version = policy_version
        for request_id, track in self._tracks.items():
            stats = track.stats or live_stats.get(request_id)
            track.stats = stats
            cut = _Cut(stats.num_generation_tokens if stats else 0, policy_version, resumed_at, stats)
            track.cuts.append(cut)
            if stats is not None:
                self._open.append(cut)

    def on_batch(self) -> None:
        """Call after the frontend processed one engine step: advance or close open cuts."""
        if not self._open:
            return
        still_open = []
        for cut in self._open:
            if cut.stats.last_token_ts < cut.resumed_at:
                cut.start = cut.stats.num_generation_tokens  # a pre-resume step: still old weights
                still_open.append(cut)
            else:
                cut.open = False
        self._open = still_open

    def finish(self, request_id: str, num_tokens: int, last_token_ts: float | None) -> list[int]:
        """Stop tracking a request; return the policy_version of each of its `num_tokens` tokens.

        `last_token_ts` is the request's final stats timestamp (None without stats); it
        resolves cuts whose request the frontend did not know at resume time.
        """
        track = self._tracks.pop(request_id)
        versions = [track.cuts[0].version] * num_tokens
        for cut in track.cuts[1:]:
            if cut.open:
                self.on_batch()  # the final step was processed; bring the cut up to date
                cut.open = False
            start = cut.start
            if cut.stats is None:  # unknown at resume: either not yet added (0) or already done
                done_before = last_token_ts is not None and 0 < last_token_ts < cut.resumed_at
                start = num_tokens if done_before else 0
            start = min(start, num_tokens)
            versions[start:] = [cut.version] * (num_tokens - start)
        self._open = [c for c in self._open if c.open]
        return versions

    def cut_positions(self, request_id: str) -> list[tuple[int, int]]:
        """(start, version) of every cut of a live request (for logs and tests)."""
        return [(c.start, c.version) for c in self._tracks[request_id].cuts]

    def __len__(self) -> int:
        return len(self._tracks)
