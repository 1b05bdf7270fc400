"""`verl-async data=calculator`: the tiny model learns the multi-turn calculator task on CPU.

Slow (about 3 minutes on the 2-core box: ~100 s of start-up, then 20 steps): run with
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
    rewards = [r["rollout/reward_mean"] for r in steps]  # nan: no group finished during that step
    fifth = len(rewards) // 5
    first, last = _mean(rewards[:fifth]), _mean(rewards[-fifth:])
    assert last > first + 0.05, rewards


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    assert values, "no reward recorded in this fifth of the run"
    return sum(values) / len(values)


def test_calculator_episodes_use_the_tool(calculator_run):
    final, steps = calculator_run
    turns = [r["rollout/turns_mean"] for r in steps if not math.isnan(r["rollout/turns_mean"])]
    assert sum(turns) / len(turns) > 1.5  # most episodes call the calculator, then answer
    assert final["rollout/env_errors"] == 0 and final["rollout/episodes_done"] > 0
    assert final["ledger/balance"] == 0 and final["rollout/token_conservation_errors"] == 0
    on_policy = [r["train/mismatch_kl"] for r in steps if r["staleness/max"] == 0]
    assert on_policy and max(on_policy) < 1e-6
