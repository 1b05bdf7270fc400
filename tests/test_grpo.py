"""GRPO / Dr.GRPO advantages and the zero-variance test, against hand-computed values."""

import math

import pytest

from verl_async.algorithms.advantages import compute_advantages, group_advantages, is_zero_variance


def test_grpo_normalises_by_unbiased_std():
    # mean 0.5; unbiased std = sqrt(4 * 0.25 / 3) = sqrt(1/3)
    adv = group_advantages([1.0, 0.0, 0.0, 1.0])
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert adv == pytest.approx([expected, -expected, -expected, expected], rel=1e-9)


def test_drgrpo_only_centres():
    assert group_advantages([3.0, 1.0, 2.0], scale_by_std=False) == pytest.approx([1.0, -1.0, 0.0])


def test_grpo_uneven_group():
    r = [1.0, 0.0, 0.0, 0.0]  # mean 0.25, std = sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    assert group_advantages(r) == pytest.approx([0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001])
    assert sum(group_advantages(r)) == pytest.approx(0.0, abs=1e-12)


def test_constant_and_single_groups_get_zero():
    assert group_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    assert group_advantages([5.0]) == [0.0]
    assert group_advantages([]) == []


def test_compute_advantages_per_group():
    out = compute_advantages([[1.0, 0.0], [2.0, 2.0, 5.0]], method="drgrpo")
    assert out[0] == pytest.approx([0.5, -0.5])
    assert out[1] == pytest.approx([-1.0, -1.0, 2.0])
    with pytest.raises(ValueError, match="grpo or drgrpo"):
        compute_advantages([[1.0]], method="ppo")


def test_is_zero_variance():
    assert is_zero_variance([1.0, 1.0, 1.0])
    assert is_zero_variance([0.3])
    assert not is_zero_variance([1.0, 0.0])
    assert is_zero_variance([1.0, 1.0 + 1e-9], tol=1e-6)
