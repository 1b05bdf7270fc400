"""`verl-async data=calculator`: the tiny model learns the multi-turn calculator task on CPU.

Slow (about 3-4 minutes on the 2-core box: ~90 s of start-up, 20 steps of ~4.5 s): run with
`make test-all` or `pytest -m slow tests/test_calculator_learns.py`.
"""

import math

import pytest
from pipeline_runs import compose_job, read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def calculator_run(tmp_path_factory, ray_session):
    from verl_async.main import run

    out = tmp_path_factory.mktemp("calculator")
    final = run(compose_job(out, "data=calculator", "logging.plots=false"))
    steps, _ = read_metrics(out)
    return final, steps


def test_calculator_reward_rises(calculator_run):
    _, steps = calculator_run
    rewards = [r["rollout/reward_mean"] for r in steps]
    fifth = len(rewards) // 5
    first, last = sum(rewards[:fifth]) / fifth, sum(rewards[-fifth:]) / fifth
    assert last > first + 0.05, rewards


def test_calculator_episodes_use_the_tool(calculator_run):
    final, steps = calculator_run
    turns = [r["rollout/turns_mean"] for r in steps if not math.isnan(r["rollout/turns_mean"])]
    assert sum(turns) / len(turns) > 1.5  # most episodes call the calculator, then answer
    assert final["rollout/env_errors"] == 0 and final["rollout/episodes_done"] > 0
    assert final["ledger/balance"] == 0 and final["rollout/token_conservation_errors"] == 0
    on_policy = [r["train/mismatch_kl"] for r in steps if r["staleness/max"] == 0]
    assert on_policy and max(on_policy) < 1e-6
