"""A job the Ray cluster can never hold fails in seconds (not after a placement-group timeout), naming
the resources, the roles and the config keys; nothing is left reserved. Real local Ray (8 CPUs, no GPU)."""

import time

import pytest
from pipeline_runs import compose_job

from verl_async.pipeline.resources import ClusterTooSmallError


def _pgs(ray):
    return {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}


@pytest.mark.parametrize("overrides, device, expected", [
    (["trainer.num_workers=2", "cluster.cpus_per_trainer_worker=8"], "cpu",
     ["CPU: the job needs 17, the cluster has 8", "trainer 16 (trainer.num_workers=2",
      "cluster.cpus_per_trainer_worker=8 CPUs", "rollout 1 (rollout.num_servers=1"]),
    (["rollout=gpu", "trainer=gpu", "cluster=gpu_1x2", "cluster.cpus_per_rollout_server=1",
      "cluster.cpus_per_trainer_worker=1"], "cuda",
     ["GPU: the job needs 2, the cluster has 0", "share one GPU", "cluster=gpu_1x1"]),
    (["rollout=gpu", "trainer=gpu", "cluster=gpu_1x1", "cluster.cpus_per_rollout_server=1",
      "cluster.cpus_per_trainer_worker=1"], "cuda",
     ["GPU: the job needs 1, the cluster has 0", "rollout + trainer (shared GPU) 1 (cluster.shared_gpu=true"]),
], ids=["cpus", "gpus", "shared-gpu"])
def test_too_small_cluster_fails_in_seconds(ray_session, tmp_path, overrides, device, expected):
    from verl_async.pipeline.driver import run_pipeline

    job = compose_job(tmp_path, *overrides)
    before = _pgs(ray_session)
    t0 = time.monotonic()
    with pytest.raises(ClusterTooSmallError) as err:
        run_pipeline(job, device)
    elapsed = time.monotonic() - t0
    msg = str(err.value)
    for text in expected:
        assert text in msg, (text, msg)
    assert "add nodes" in msg
    assert elapsed < 10.0, elapsed
    assert _pgs(ray_session) == before  # nothing reserved, nothing to clean up
