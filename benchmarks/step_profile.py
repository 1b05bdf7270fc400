"""Where a training step's time goes: one step under torch.profiler, summarised without a trace file.

    with profiled() as prof:
        run_one_step()
    summary = summarise(prof, wall_s)

The summary has the device's busy time (the union of kernel intervals, so overlapping streams
are not counted twice), its idle share of the step's wall time, kernel time per category
(matmul, attention, communication/copies, optimizer, other elementwise and reductions), and the
top kernels by total time with their call counts.
"""

import contextlib
import re
from collections.abc import Iterator

CATEGORIES = (  # first match wins; names are CUDA kernel names
    ("attention", re.compile(r"flash|fmha|attn|attention", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul|sm90_|sm80_", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("comm_copy", re.compile(r"nccl|memcpy|memset|copy|cat|split|chunk_cat|fsdp", re.I)),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "elementwise_other"


@contextlib.contextmanager
def profiled() -> Iterator[object]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=False) as prof:
        yield prof


def _kernel_events(prof) -> list:
    from torch.autograd import DeviceType

    return [e for e in prof.events() if e.device_type == DeviceType.CUDA]


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarise(prof, wall_s: float, top: int = 25) -> dict:
    kernels = _kernel_events(prof)
    per_name: dict[str, list[float]] = {}
    per_cat: dict[str, float] = {}
    intervals = []
    for e in kernels:
        dur = e.time_range.end - e.time_range.start
        intervals.append((e.time_range.start, e.time_range.end))
        per_name.setdefault(e.name, []).append(dur)
        cat = category(e.name)
        per_cat[cat] = per_cat.get(cat, 0.0) + dur
    if not kernels:  # a torch whose profiler did not expose device events: per-op device totals only
        return {"wall_s": wall_s, "device_busy_s": None, "kernels": 0,
                "top_ops": [{"name": a.key[:120], "calls": a.count, "device_ms": a.self_device_time_total / 1e3}
                            for a in sorted(prof.key_averages(), key=lambda a: -a.self_device_time_total)[:top]]}
    busy = busy_us(intervals) / 1e6
    ranked = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "wall_s": wall_s,
        "device_busy_s": busy,
        "device_idle_share": max(0.0, 1.0 - busy / wall_s) if wall_s > 0 else None,
        "kernels": len(kernels),
        "category_s": {k: v / 1e6 for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:120], "calls": len(d), "total_ms": sum(d) / 1e3, "category": category(n)}
                        for n, d in ranked],
    }
