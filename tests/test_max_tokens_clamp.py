"""Unit tests of the generation budget (verl_async.rollout.sampling.clamp_max_tokens): pure, no engine."""

import pickle

import pytest

from verl_async.rollout.sampling import PromptTooLongError, clamp_max_tokens


def test_max_tokens_clamp_default_is_response_length_not_the_window():
    # verl #5504: the default must not be max_model_len - prompt_len (here 4000)
    assert clamp_max_tokens(prompt_len=96, max_model_len=4096, response_length=64) == 64


def test_max_tokens_clamp_explicit_max_tokens_wins_over_default():
    assert clamp_max_tokens(96, 4096, 64, max_tokens=200) == 200
    assert clamp_max_tokens(96, 4096, 64, max_tokens=10) == 10


def test_max_tokens_clamp_max_new_tokens_used_when_no_max_tokens():
    assert clamp_max_tokens(96, 4096, 64, max_new_tokens=300) == 300
    assert clamp_max_tokens(96, 4096, 64, max_tokens=20, max_new_tokens=300) == 20


def test_max_tokens_clamp_explicit_is_still_clamped_to_the_window():
    assert clamp_max_tokens(4000, 4096, 64, max_tokens=500) == 96
    assert clamp_max_tokens(4000, 4096, 64, max_new_tokens=500) == 96
    assert clamp_max_tokens(4000, 4096, 500) == 96


def test_max_tokens_clamp_prompt_near_max_model_len():
    assert clamp_max_tokens(4095, 4096, 64) == 1
    assert clamp_max_tokens(4094, 4096, 64, max_tokens=1) == 1


@pytest.mark.parametrize("prompt_len", [4096, 5000])
def test_max_tokens_clamp_prompt_too_long_raises_typed_error(prompt_len):
    with pytest.raises(PromptTooLongError) as err:
        clamp_max_tokens(prompt_len, 4096, 64, prompt_id="p-17")
    e = err.value
    assert isinstance(e, ValueError)
    assert (e.prompt_id, e.prompt_len, e.max_model_len) == ("p-17", prompt_len, 4096)
    assert "p-17" in str(e) and "max_prompt_length" in str(e) and "max_model_len" in str(e)


def test_max_tokens_clamp_error_survives_pickling():
    # it crosses Ray actor boundaries: the fields must come back
    e = pickle.loads(pickle.dumps(PromptTooLongError("p", 10, 8)))
    assert (e.prompt_id, e.prompt_len, e.max_model_len) == ("p", 10, 8)


def test_max_tokens_clamp_resumed_request_gets_only_what_is_left():
    # verl #7207: a resumed request overshot its budget (8192 -> 10104)
    assert clamp_max_tokens(100, 16384, 8192, already_generated=3000) == 5192
    assert clamp_max_tokens(100, 16384, 64, max_tokens=8192, already_generated=8000) == 192
    # resubmitted as prompt + generated: the window counts both
    assert clamp_max_tokens(100 + 8000, 8192, 8192, already_generated=8000) == 92
    assert clamp_max_tokens(100, 16384, 8192, already_generated=8192) == 0
    assert clamp_max_tokens(100, 16384, 8192, already_generated=9000) == 0


def test_max_tokens_clamp_rejects_bad_inputs():
    with pytest.raises(ValueError):
        clamp_max_tokens(10, 100, 64, max_tokens=-1)
    with pytest.raises(ValueError):
        clamp_max_tokens(-1, 100, 64)
    with pytest.raises(ValueError):
        clamp_max_tokens(10, 100, 64, already_generated=-3)
