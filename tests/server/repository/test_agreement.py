"""`top1_agreement`: how a lower-precision graph's top-1 is judged against fp32 (the build's
int8 check and the GPU acceptance run's fp16 check both use it)."""

from __future__ import annotations

import numpy as np

from server.repository import top1_agreement

# Three images, three classes: a clear winner, a near-tie, another clear winner.
REFERENCE = np.array([[5.0, 1.0, 0.0], [2.0, 1.9, 0.0], [0.0, 1.0, 4.0]], dtype=np.float32)


def test_a_near_tie_may_flip() -> None:
    flipped = REFERENCE.copy()
    flipped[1] = [1.95, 1.96, 0.0]  # each logit moved by less than the bound
    judged = top1_agreement(REFERENCE, flipped, error_bound=0.25)
    assert (judged.equal, judged.near_ties, judged.decisive_flips) == (2, 1, 0)
    assert judged.passed
    assert judged.rate == 2 / 3


def test_a_decisive_flip_fails() -> None:
    flipped = REFERENCE.copy()
    flipped[0] = [4.9, 5.0, 0.0]  # margin 4 > 2 x 0.25, and the top-1 moved
    judged = top1_agreement(REFERENCE, flipped, error_bound=0.25)
    assert judged.decisive_flips == 1
    assert not judged.passed
    assert "1 decisive flips" in judged.summary()


def test_an_error_past_the_bound_fails_even_without_a_flip() -> None:
    shifted = REFERENCE + np.array([0.0, 0.0, 0.5], dtype=np.float32)
    judged = top1_agreement(REFERENCE, shifted, error_bound=0.25)
    assert judged.equal == 3 and judged.decisive_flips == 0
    assert not judged.passed


def test_equal_logits_agree_everywhere() -> None:
    judged = top1_agreement(REFERENCE, REFERENCE, error_bound=0.0)
    assert judged.passed and judged.rate == 1.0 and judged.max_abs_error == 0.0
