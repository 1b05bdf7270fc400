"""GPU: trainer and rollout engine on one GPU (cluster=gpu_1x1, CUDA-IPC weight sync).

- ipc_conservation: a counter engine and a trainer stand-in on one GPU, 1 MiB buckets (many buckets,
  both staging buffers in use): every in-flight request switches STEP cleanly at each sync, exact counts.
- pipeline_modes: the real pipeline on the tiny model in every mode, a few steps each: IPC syncs,
  no token lost, ledger balanced, staleness within its bound.
- memory_check: a trainer that cannot fit beside the engine fails before its model is built, saying what to lower.

Run on a GPU machine: `python -m pytest -q -s tests/test_one_gpu_gpu.py` (about 10 minutes on one H200: each pipeline test starts Ray, an engine and a trainer).
"""

import asyncio
import sys
import time
from pathlib import Path

import pytest
from pipeline_runs import compose_job, read_metrics

pytestmark = pytest.mark.gpu
ONE_GPU = ["rollout=gpu", "trainer=gpu", "cluster=gpu_1x1", "cluster.cpus_per_rollout_server=2",
           "cluster.cpus_per_trainer_worker=2", "rollout.enforce_eager=true", "rollout.max_model_len=512",
           "data.max_prompt_length=64", "rollout.response_length=32", "pipeline.batch_groups=4", "rollout.n=4",
           "trainer.save_at_end=false", "logging.plots=false"]


def test_ipc_conservation_on_one_gpu():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import weight_sync_gpu

    args = weight_sync_gpu.parse_args(["--backend", "ipc", "--rounds", "2", "--requests", "16", "--tokens", "1024",
                                       "--warm-s", "0.2", "--bucket-mib", "1", "--eager",
                                       "--gpu-memory-utilization", "0.3"])
    result = asyncio.run(weight_sync_gpu.run_shape("small", args))
    print(weight_sync_gpu.summarize([result]))
    assert result["requests_switched_cleanly"] == [16, 16]
    assert result["median"]["sync/buckets"] > 2  # many buckets through two alternating buffers


@pytest.mark.parametrize("mode", ["partial_rollout", "sync_baseline", "async", "streaming"])
def test_pipeline_modes_on_one_gpu(ray_session, tmp_path, mode):
    from verl_async.main import run

    steps = 4 if mode == "streaming" else 3
    final = run(compose_job(tmp_path, *ONE_GPU, f"pipeline={mode}", f"pipeline.total_steps={steps}"))
    records, _ = read_metrics(tmp_path)
    assert len(records) == steps
    assert final["sync/count"] == (steps // 2 if mode == "streaming" else steps)
    assert final["rollout/token_conservation_errors"] == 0 and final["ledger/balance"] == 0
    bound = 0 if mode == "sync_baseline" else 1
    assert max(r["staleness/max"] for r in records) <= bound
    synced = [r for r in records if "sync/total_s" in r]
    assert synced and all(r["sync/buckets"] >= 1 for r in synced)  # the IPC path
    assert all(r["perf/trainer_tokens_per_s"] > 0 for r in records)


def test_memory_check_fails_before_the_trainer_builds(ray_session, tmp_path):
    from verl_async.main import run

    t0 = time.monotonic()
    with pytest.raises(Exception, match=r"trainer\.micro_batch_max_tokens to \d+ or less") as err:
        run(compose_job(tmp_path, *ONE_GPU, "trainer.micro_batch_max_tokens=1000000000",
                        "model.gradient_checkpointing=false"))
    assert "model.gradient_checkpointing=true" in str(err.value) and "smaller model" in str(err.value)
    assert time.monotonic() - t0 < 180
