"""Multi-turn rollouts without an engine: the chat-template delta, the episode state machine
(budgets, window, turns, environment failures), the environment registry, the calculator, and
how episodes become TrainRows. The engine-backed tests are in test_multi_turn.py.

`CountingManager` stands in for RolloutManager here (pure logic): like the counter model, each
turn emits prompt[-1] + 1, + 2, ...; a turn ends with STOP on a stop id, else LENGTH at its budget,
which is clamped by the real clamp_max_tokens.
"""

import asyncio
import json
import math

import pytest
from transformers import AutoTokenizer

from verl_async.config import EnvConfig
from verl_async.data.prompts import encode_text_prompt
from verl_async.envs import EnvStep, ModelTurn, check_env_at_startup, resolve_env
from verl_async.envs.calculator import CalculatorEnv, calculator_task
from verl_async.envs.scripted import ScriptedEnv
from verl_async.pipeline.batch import build_train_batch, split_by_staleness
from verl_async.rollout.multi_turn import EpisodeEnd, MultiTurnWorkflow
from verl_async.rollout.sampling import clamp_max_tokens
from verl_async.rollout.turn_format import TurnFormat
from verl_async.training.batching import make_micro_batches
from verl_async.types import EnginePrompt, FinishReason, Generation, Group, PromptRow, Sample

EOS = 2  # <|im_end|> of the tiny tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    return AutoTokenizer.from_pretrained(tiny_path)


class CountingManager:
    def __init__(self, max_model_len=64, response_length=16, version=0):
        self.max_model_len = max_model_len
        self.response_length = response_length
        self.version = version
        self.sent: list[tuple[list[int], int]] = []  # (prompt ids, max_tokens) of every request

    async def generate(self, prompt_id, request_id, prompt, max_tokens=None, sampling=None, affinity_key=None):
        budget = clamp_max_tokens(len(prompt.prompt_ids), self.max_model_len, self.response_length,
                                  max_tokens=max_tokens, prompt_id=prompt_id)
        self.sent.append((list(prompt.prompt_ids), budget))
        stops = set((sampling or {}).get("stop_token_ids", [])) | {EOS}
        out, prev = [], prompt.prompt_ids[-1]
        while len(out) < budget:
            prev = (prev + 1) % 1024
            out.append(prev)
            if prev in stops:
                break
        reason = FinishReason.STOP if out and out[-1] in stops else FinishReason.LENGTH
        return Generation(request_id, list(prompt.prompt_ids), out, [-0.5] * len(out), [self.version] * len(out), reason)


def workflow(tokenizer, manager, make_env, **env):
    cfg = EnvConfig(name="scripted", **env)
    return MultiTurnWorkflow(cfg, make_env, manager, tokenizer, response_length=manager.response_length)


def run(wf, prompt_ids, row=None):
    row = row or PromptRow("p", [{"role": "user", "content": "q"}])
    return asyncio.run(wf.run_episode(row, "ep", EnginePrompt(list(prompt_ids))))


# ---- the chat template delta ------------------------------------------------------------------

def test_observation_tokens_render_the_same_text_as_the_whole_conversation(tokenizer):
    fmt = TurnFormat.from_tokenizer(tokenizer, "tool")
    row = PromptRow("p", [{"role": "user", "content": "What is 2 plus 3?"}])
    prompt = encode_text_prompt(row, tokenizer).prompt_ids
    turn = tokenizer("calc 2 3", add_special_tokens=False)["input_ids"] + [EOS]
    obs = fmt.observation_ids("2 + 3 = 5", turn_ended_with_eos=True)
    want = tokenizer.apply_chat_template(
        row.messages + [{"role": "assistant", "content": "calc 2 3"}, {"role": "tool", "content": "2 + 3 = 5"}],
        add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(prompt + turn + obs) == want
    cut = fmt.observation_ids("2 + 3 = 5", turn_ended_with_eos=False)
    assert cut == [EOS, *obs]  # a turn cut by its cap is closed by an environment EOS


def test_observation_format_rejects_a_template_without_eos(tokenizer):
    class NoEos:
        eos_token = "<|im_end|>"

        def apply_chat_template(self, messages, **kw):
            return "".join(m["content"] + " " for m in messages)

    with pytest.raises(ValueError, match="token ids instead"):
        TurnFormat.from_tokenizer(NoEos(), "tool")


# ---- the episode state machine ----------------------------------------------------------------

def test_episode_ids_masks_and_turns_are_exact(tokenizer):
    env = ScriptedEnv(observations=[[300, 301], [500]], rewards=[0.25, 0.0, 1.0], done_at_turn=2)
    m = CountingManager()
    wf = workflow(tokenizer, m, lambda: env, stop_token_ids=[105, 304], max_tokens_per_turn=4)
    ep = run(wf, [100])
    g = ep.generation
    assert g.response_ids == [101, 102, 103, 104, 300, 301, 302, 303, 304, 500, 501, 502, 503, 504]
    assert g.loss_mask == [1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1]
    assert g.logprobs == [-0.5] * 4 + [0.0] * 2 + [-0.5] * 3 + [0.0] + [-0.5] * 4
    assert ep.turn_spans == [(0, 4), (6, 9), (10, 14)] and ep.num_turns == 3
    assert ep.end == EpisodeEnd.DONE and g.finish_reason == FinishReason.STOP
    assert ep.env_reward == 1.25 and ep.answer == tokenizer.decode([501, 502, 503, 504], skip_special_tokens=True)
    # every turn was sent exactly the ids before it, with the per-turn cap as its budget
    assert m.sent == [([100], 4), ([100, 101, 102, 103, 104, 300, 301], 4),
                      ([100] + g.response_ids[:10], 4)]
    assert [t.finish_reason for t in env.turns] == [FinishReason.LENGTH, FinishReason.STOP, FinishReason.LENGTH]
    assert env.turns[1].token_ids == [302, 303, 304]


def test_text_observation_adds_eos_only_after_a_cut_turn(tokenizer):
    fmt = TurnFormat.from_tokenizer(tokenizer, "tool")
    env = ScriptedEnv(observations=["hi"], done_at_turn=1)
    wf = workflow(tokenizer, CountingManager(), lambda: env, max_tokens_per_turn=8)
    ep = run(wf, [1020])  # 1021, 1022, 1023, 0, 1, 2=EOS: the model ends its own turn
    g = ep.generation
    assert g.response_ids[:6] == [1021, 1022, 1023, 0, 1, EOS]
    obs = fmt.observation_ids("hi", turn_ended_with_eos=True)
    assert g.response_ids[6:6 + len(obs)] == obs and obs[0] != EOS
    ep2 = run(workflow(tokenizer, CountingManager(), lambda: ScriptedEnv(observations=["hi"], done_at_turn=1),
                       max_tokens_per_turn=3), [100])
    assert ep2.generation.response_ids[3:4] == [EOS] and ep2.generation.loss_mask[3] == 0


@pytest.mark.parametrize("env_kw, manager_kw, end", [
    ({"max_turns": 2}, {}, EpisodeEnd.MAX_TURNS),
    ({"max_episode_tokens": 10, "max_tokens_per_turn": 4}, {}, EpisodeEnd.BUDGET),
    ({"max_episode_tokens": 500, "max_turns": 50}, {"max_model_len": 40}, EpisodeEnd.WINDOW),
])
def test_truncated_episodes_are_marked_and_get_no_answer(tokenizer, env_kw, manager_kw, end):
    m = CountingManager(**manager_kw)
    wf = workflow(tokenizer, m, lambda: ScriptedEnv(observations=[[7, 8]], rewards=[0.5] * 100), **env_kw)
    ep = run(wf, [100])
    g = ep.generation
    assert ep.end == end and g.finish_reason == FinishReason.LENGTH and ep.answer is None
    assert ep.env_reward == 0.5 * (ep.num_turns - (end != EpisodeEnd.MAX_TURNS))
    assert len(g.response_ids) <= wf.env.max_episode_tokens
    assert len(g.prompt_ids) + len(g.response_ids) <= m.max_model_len
    for prompt, budget in m.sent:  # every turn's budget: min(remaining episode budget, cap, window)
        used = len(prompt) - 1
        assert budget == min(wf.env.max_episode_tokens - used, wf.turn_cap, m.max_model_len - len(prompt))
    assert wf.pop_metrics()[f"rollout/episodes_{end.value}"] == 1


def test_window_truncation_fills_the_window_exactly(tokenizer):
    m = CountingManager(max_model_len=40)
    wf = workflow(tokenizer, m, lambda: ScriptedEnv(observations=[[7]]), max_episode_tokens=500, max_turns=50)
    g = run(wf, [100]).generation
    assert len(g.prompt_ids) + len(g.response_ids) == 40  # the last turn got exactly what was left


def test_observation_that_does_not_fit_ends_the_episode_without_it(tokenizer):
    wf = workflow(tokenizer, CountingManager(), lambda: ScriptedEnv(observations=[[9] * 20]),
                  max_episode_tokens=20, max_tokens_per_turn=4)
    ep = run(wf, [100])
    assert ep.end == EpisodeEnd.BUDGET and ep.generation.response_ids == [101, 102, 103, 104]


class _BrokenEnv:
    def __init__(self, where, value=None):
        self.where, self.value = where, value

    async def start(self, row):
        if self.where == "start":
            raise KeyError("no such row")

    async def step(self, turn):
        if self.where == "step":
            raise RuntimeError("tool crashed")
        return self.value


@pytest.mark.parametrize("env", [
    _BrokenEnv("start"), _BrokenEnv("step"), _BrokenEnv("value", EnvStep(reward=math.nan)),
    _BrokenEnv("value", EnvStep(observation=[1, -3])), _BrokenEnv("value", {"done": True}),
    _BrokenEnv("value", EnvStep(reward="high")), None,
], ids=["start-raises", "step-raises", "nan-reward", "bad-ids", "not-an-envstep", "reward-not-a-number",
        "constructor-raises"])
def test_a_failing_environment_fails_only_its_episode(tokenizer, env):
    def make():
        if env is None:
            raise OSError("sandbox unavailable")
        return env

    wf = workflow(tokenizer, CountingManager(), make)
    ep = run(wf, [100])
    assert ep.end == EpisodeEnd.ENV_ERROR and ep.generation.finish_reason == FinishReason.ERROR
    metrics = wf.pop_metrics()
    assert metrics["rollout/env_errors"] == 1 and metrics["rollout/episodes_env_error"] == 1


def test_env_tokens_carry_the_version_before_them_and_staleness_ignores_them(tokenizer):
    m = CountingManager(version=3)
    wf = workflow(tokenizer, m, lambda: ScriptedEnv(observations=[[7, 8]], done_at_turn=1), max_tokens_per_turn=2)
    g = run(wf, [100]).generation
    assert g.policy_versions == [3, 3, 3, 3, 3, 3]
    g.policy_versions = [1, 1, 1, 1, 2, 2]  # as if a sync came between the turns
    group = Group("p", [Sample("p", "g", g)])
    assert group.min_policy_version == 1
    g.policy_versions = [4, 4, 0, 0, 4, 4]  # environment tokens never count as stale
    assert group.min_policy_version == 4
    keep, drop = split_by_staleness([group], trainer_version=5, max_staleness=1)
    assert keep == [group] and drop == []


def test_episode_rows_reach_the_trainer_with_their_masks():
    def gen(reason, mask):
        n = len(mask)
        return Generation("r", [1, 2], list(range(10, 10 + n)), [-0.1] * n, [0] * n, reason, loss_mask=mask)

    done, cut = gen(FinishReason.STOP, [1, 1, 0, 0, 1]), gen(FinishReason.LENGTH, [1, 0, 1])
    groups = [Group("p", [Sample("p", "g", done, 1.0), Sample("p", "g", cut, 0.0)])]
    batch, stats = build_train_batch(groups, step=0, trainer_version=0, advantage="grpo")
    assert [r.loss_mask for r in batch.rows] == [[1, 1, 0, 0, 1], [1, 0, 1]]
    assert stats.truncated_frac == 0.5
    masked, _ = build_train_batch(groups, step=0, trainer_version=0, advantage="grpo", mask_truncated=True)
    assert [r.loss_mask for r in masked.rows] == [[1, 1, 0, 0, 1], [0, 0, 0]]
    # the trainer's packed layout keeps every token in place: environment tokens are inputs and
    # targets like any other, only their loss mask is 0
    (mb,) = make_micro_batches(batch.rows, [0, 1], max_tokens=64, pad_id=0)
    assert mb.targets.tolist() == done.response_ids + cut.response_ids
    assert mb.input_ids[0].tolist() == [1, 2, *done.response_ids, 1, 2, *cut.response_ids]
    assert mb.loss_mask.tolist() == [[1, 1, 0, 0, 1], [1, 0, 1, 0, 0]] and mb.loss_tokens == 5


# ---- the registry and the built-in environments -----------------------------------------------

def test_registry_resolves_names_import_paths_and_files(tmp_path):
    assert isinstance(resolve_env(EnvConfig(name="calculator"))(), CalculatorEnv)
    assert isinstance(resolve_env(EnvConfig(name="verl_async.envs.scripted:ScriptedEnv"))(), ScriptedEnv)
    (tmp_path / "my_env.py").write_text(
        "class Echo:\n    def __init__(self, word='x'):\n        self.word = word\n"
        "    async def start(self, row):\n        pass\n    async def step(self, turn):\n        pass\n")
    env = resolve_env(EnvConfig(name=f"{tmp_path}/my_env.py:Echo", args={"word": "hi"}))()
    assert env.word == "hi"


@pytest.mark.parametrize("name, args, message", [
    ("nope", {}, "unknown"),
    ("verl_async.envs.nothing:Env", {}, "cannot be imported"),
    ("verl_async.envs.scripted:Missing", {}, "no attribute"),
    ("/no/such/file.py:Env", {}, "does not exist"),
    ("verl_async.envs.calculator:calculator_task", {}, "not a class"),
    ("verl_async.envs.base:EnvStep", {}, "async def"),
    ("calculator", {"max_callz": 2}, "do not fit CalculatorEnv"),
])
def test_registry_errors_say_how_to_fix(name, args, message):
    with pytest.raises(ValueError, match=message):
        resolve_env(EnvConfig(name=name, args=args))


def test_relative_file_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert EnvConfig(name="envs/mine.py:Env").name == f"{tmp_path}/envs/mine.py:Env"
    assert EnvConfig(name="calculator").name == "calculator"


def test_startup_check_makes_one_environment():
    with pytest.raises(ValueError, match="constructor raised ValueError"):
        check_env_at_startup(EnvConfig(name="calculator", args={"max_calls": -1}), "/nonexistent")


def test_startup_check_rejects_vl_models(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {}}))
    with pytest.raises(ValueError, match="text models only"):
        check_env_at_startup(EnvConfig(name="calculator"), str(tmp_path))
    check_env_at_startup(EnvConfig(), str(tmp_path))  # single-turn: nothing to check


def test_calculator_env_calls_then_answers():
    (row,) = calculator_task(1, seed=0)
    a, b = row.extra_info["operands"]
    assert row.ground_truth == str(a + b)

    async def episode(texts):
        env = CalculatorEnv()
        await env.start(row)
        return [await env.step(ModelTurn(i, [], t, FinishReason.STOP)) for i, t in enumerate(texts)]

    call, answer = asyncio.run(episode([f"calc {b} and {a}", "whatever 12"]))
    assert call == EnvStep(observation=f"{b} + {a} = {a + b}", reward=0.25, done=False)
    assert answer.done and answer.reward == 0.0
    wrong, = asyncio.run(episode(["1 2 3"]))
    assert wrong.observation == "1 + 2 + 3 = 6" and wrong.reward == 0.0
    no_call, = asyncio.run(episode(["no numbers here"]))
    assert no_call.done
