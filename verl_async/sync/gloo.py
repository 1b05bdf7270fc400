"""The gloo wire protocol shared by the trainer (rank 0) and the engines' workers (ranks 1..N).

One update: every rank joins a go/no-go all-reduce (a worker votes 1 when the update request
does not fit its model), so a rejected update fails on every rank before any data moves and
the group stays usable; then one broadcast per packed bucket (see buckets.py). Collectives go
through the group object itself with a per-call timeout, so a missing peer raises instead of
hanging forever.
"""

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def vote(group: Any, reject: bool, timeout_s: float) -> bool:
    """All ranks vote; returns True when any rank rejected the update."""
    flag = torch.tensor([1 if reject else 0], dtype=torch.int64)
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    opts.timeout = timedelta(seconds=timeout_s)
    group.allreduce([flag], opts).wait()
    return bool(flag.item())


def broadcast(group: Any, buf: torch.Tensor, timeout_s: float) -> None:
    """Broadcast `buf` (a CPU tensor) from rank 0 to every rank, in place."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    opts.timeout = timedelta(seconds=timeout_s)
    group.broadcast([buf], opts).wait()
