"""The ledger: every prompt read is accounted for. Counters are monotone; the balance is checked.

    read == trained + filtered + rejected + stale_dropped + failed + requeued + in_flight + queued

A requeued attempt (its server died mid-group) put its prompt back in line: that prompt is read
again, so each attempt is one `read` and the failed one is accounted for as `requeued`.
"""

from dataclasses import asdict, dataclass


@dataclass
class Ledger:
    read: int = 0  # prompts taken from the data source
    trained: int = 0  # groups consumed by a train step
    filtered: int = 0  # zero-variance groups dropped (dynamic sampling)
    rejected: int = 0  # prompts that could not be sent (too long, bad row)
    stale_dropped: int = 0  # groups over the staleness bound at consumption
    failed: int = 0  # groups with an aborted or failed request, or no sample with a valid reward
    requeued: int = 0  # group attempts lost with their server (the prompt was read again)
    in_flight: int = 0  # groups being generated or scored
    queued: int = 0  # complete groups waiting in the sample queue

    def balance(self) -> int:
        """0 when every prompt read is accounted for."""
        return self.read - (self.trained + self.filtered + self.rejected + self.stale_dropped + self.failed
                            + self.requeued + self.in_flight + self.queued)

    def metrics(self) -> dict[str, float]:
        return {f"ledger/{k}": float(v) for k, v in asdict(self).items()} | {"ledger/balance": float(self.balance())}
