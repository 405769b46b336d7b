"""``worker.training.callbacks.divergence``: which logged losses and gradient norms end a run."""

from __future__ import annotations

import math

import pytest

from worker.training.callbacks import (
    GRAD_NORM_EXPLOSION_FACTOR,
    LOSS_EXPLOSION_FACTOR,
    divergence,
)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_or_gradient_norm_is_nan_loss(bad: float) -> None:
    for loss, grad_norm in ((bad, 1.0), (1.0, bad)):
        found = divergence(loss, grad_norm, 1.0, 1.0)
        assert found is not None and found.non_finite, (loss, grad_norm)
    found = divergence(bad, None, None, None)  # the first log: no reference yet, still caught
    assert found is not None and found.non_finite


def test_a_loss_far_above_the_first_one_is_an_explosion() -> None:
    # IPO, beta 0.1: the first loss is (1/(2*0.1))**2 = 25
    assert divergence(25.0 * LOSS_EXPLOSION_FACTOR * 0.99, 1.0, 25.0, 1.0) is None
    found = divergence(25.0 * LOSS_EXPLOSION_FACTOR * 1.01, 1.0, 25.0, 1.0)
    assert found is not None and not found.non_finite and found.reason.startswith("the loss exploded to 2525")


def test_a_gradient_norm_far_above_the_first_one_is_an_explosion() -> None:
    first = 3.0
    assert divergence(1.0, first * GRAD_NORM_EXPLOSION_FACTOR * 0.99, 1.0, first) is None
    found = divergence(1.0, first * GRAD_NORM_EXPLOSION_FACTOR * 1.01, 1.0, first)
    assert found is not None and not found.non_finite and "gradient norm exploded" in found.reason


def test_small_first_values_are_floored_so_a_run_starting_near_zero_is_not_diverged() -> None:
    # first loss 0.001: 100x would be 0.1, an ordinary loss; the floor (1.0) puts the limit at 100
    assert divergence(50.0, 0.5, 0.001, 1e-6) is None
    assert divergence(101.0, 0.5, 0.001, 1e-6) is not None


def test_the_scale_of_a_tiny_beta_is_kept() -> None:
    # IPO, beta 1e-6: the first loss is 2.5e11 and must not count as exploded, 100x that must
    assert divergence(2.6e11, 1e6, 2.5e11, 1e6) is None
    assert divergence(2.6e13, 1e6, 2.5e11, 1e6) is not None
