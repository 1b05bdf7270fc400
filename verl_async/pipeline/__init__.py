"""The asynchronous controller: rollouter, sample queue, staleness, sync triggers, ledger."""
