"""Staleness: admission control for the rollouter and the hard bound at consumption. Pure.

Let B = batch_groups, s = max_staleness, e = the engines' policy_version, and
`committed` = groups started that will be trained (trained + queued + in flight; groups
that were filtered, rejected or dropped free their slot). Train step k (0-based) uses the
trainer at policy_version k and consumes groups k*B .. (k+1)*B-1 in completion order. A
group started now is trained at a step k <= committed // B, so its version lag is at most
committed // B - e. Admitting only while

    committed < (e + s + 1) * B

keeps that lag <= s whenever syncs keep up. Groups can still finish out of order, and a
sync can lag, so the bound is enforced again, exactly, when a batch is formed: a group whose
oldest token is older than (trainer policy_version - s) is never trained on (counted).

After a resume at step k the k*B groups trained before the checkpoint are still committed:
a rollouter that forgot them would see room for k*B more groups than the bound allows.
"""


def committed_groups(resumed_step: int, batch_groups: int, read: int, freed: int) -> int:
    """Groups that will be (or were) trained: those consumed before a resume at `resumed_step`,
    plus those read in this run (restored queued groups count as read) minus those that freed
    their slot (filtered, rejected, failed, dropped as stale)."""
    return resumed_step * batch_groups + read - freed


def admission_capacity(engine_version: int, committed_groups: int, batch_groups: int, max_staleness: int) -> int:
    """How many more groups the rollouter may start now (never negative)."""
    return max(0, (engine_version + max_staleness + 1) * batch_groups - committed_groups)


def version_lag(trainer_version: int, token_version: int) -> int:
    """Lag of a token produced by `token_version` weights when trained at `trainer_version`."""
    return trainer_version - token_version


def within_bound(trainer_version: int, oldest_token_version: int, max_staleness: int) -> bool:
    """The hard bound: every token of a group must be at most max_staleness versions old."""
    return version_lag(trainer_version, oldest_token_version) <= max_staleness
