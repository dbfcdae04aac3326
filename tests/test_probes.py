"""Probe vectors: a seed gives the same vectors in every dtype (Rademacher ones are drawn in the target dtype for
speed, so this is what keeps float32 and float64 estimates on the same probes), with the distribution's moments."""

from __future__ import annotations

import pytest
import torch

from flatminima.sharpness.probes import random_vectors


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_a_seed_gives_the_same_vectors_in_every_dtype(distribution: str) -> None:
    def draw(dtype: torch.dtype) -> torch.Tensor:
        return random_vectors(3, 1001, torch.Generator().manual_seed(5), distribution, dtype, "cpu")

    reference = draw(torch.float64)
    assert reference.dtype == torch.float64 and reference.shape == (3, 1001)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        vectors = draw(dtype)
        assert vectors.dtype == dtype
        assert torch.equal(vectors, reference.to(dtype))


def test_rademacher_entries_are_plus_or_minus_one_with_equal_probability() -> None:
    vectors = random_vectors(64, 4096, torch.Generator().manual_seed(0), "rademacher", torch.float32, "cpu")
    assert set(vectors.unique().tolist()) == {-1.0, 1.0}
    assert abs(vectors.mean().item()) < 5 / 512  # 5 standard errors of the mean of 262,144 signs
    # E[v v^T] = I: the sample second moment of two coordinates is near 0 off the diagonal, exactly 1 on it
    assert torch.equal((vectors**2).mean(dim=0), torch.ones(4096))
    assert abs((vectors[:, 0] * vectors[:, 1]).mean().item()) < 5 / 8


def test_the_stream_matches_the_integer_draws() -> None:
    """The 0/1 draws do not depend on the dtype they are drawn in (what drawing in the target dtype relies on)."""
    integers = torch.randint(0, 2, (2, 777), generator=torch.Generator().manual_seed(9))
    vectors = random_vectors(2, 777, torch.Generator().manual_seed(9), "rademacher", torch.float32, "cpu")
    assert torch.equal(vectors, integers.to(torch.float32) * 2 - 1)
