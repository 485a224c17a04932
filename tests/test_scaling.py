"""Whitening's Cholesky factor: exact, computed in place, and shifted only as far as it must be."""

from __future__ import annotations

import pytest
import torch

from asvd_passes.errors import InvalidInputError
from asvd_passes.graph.observers import InputStatistics
from asvd_passes.scaling import shared_scalings, whitening_scaling


def _stats(features: int, tokens: int, seed: int = 0) -> InputStatistics:
    stats = InputStatistics(features, ("gram",), ("x",))
    stats(torch.randn(tokens, features, generator=torch.Generator().manual_seed(seed)))
    return stats


def _shift(factor: torch.Tensor, mean_gram: torch.Tensor) -> tuple[float, float]:
    """(largest off-diagonal error of L·Lᵀ, the diagonal shift relative to the mean diagonal)."""
    difference = factor @ factor.T - mean_gram
    off = (difference - torch.diag(difference.diagonal())).abs().max().item()
    return off, (difference.diagonal().mean() / mean_gram.diagonal().mean()).item()


@pytest.mark.parametrize("consume", [False, True])
def test_full_rank_gram_is_factored_exactly_without_a_shift(consume):
    stats = _stats(64, 500)
    mean_gram = stats.gram / stats.count
    storage = stats.gram.data_ptr()
    factor = whitening_scaling(stats, consume=consume).cholesky
    assert torch.equal(factor, factor.tril())
    assert torch.allclose(factor @ factor.T, mean_gram, atol=1e-12)
    # Consumed: the Gram's own buffer holds the factor (no n² copy) and the statistics let go of it.
    assert (factor.data_ptr() == storage) is consume
    assert (stats.gram is None) is consume
    if not consume:
        assert torch.equal(stats.gram / stats.count, mean_gram)


@pytest.mark.parametrize("consume", [False, True])
def test_rank_deficient_gram_gets_the_smallest_shift_that_works(consume):
    """Fewer tokens than features: the first try fails, the matrix is restored, and 1e-6 of the mean diagonal is added."""
    stats = _stats(96, 40)
    mean_gram = stats.gram / stats.count
    factor = whitening_scaling(stats, consume=consume).cholesky
    off, shift = _shift(factor, mean_gram)
    assert off < 1e-12 and shift == pytest.approx(1e-6, rel=1e-3)


def test_indefinite_gram_is_restored_between_tries():
    """An eigenvalue of −3e-4 of the mean diagonal needs the 1e-3 shift: three failed tries restore the matrix each time."""
    stats = _stats(48, 200)
    q, _ = torch.linalg.qr(torch.randn(48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    eigenvalues = torch.linspace(1.0, 2.0, 48, dtype=torch.float64)
    eigenvalues[0] = -3e-4 * eigenvalues.mean()
    mean_gram = (q * eigenvalues) @ q.T
    mean_gram = (mean_gram + mean_gram.T) / 2
    stats.gram, stats.count = mean_gram.clone() * 10, 10
    factor = whitening_scaling(stats, consume=True).cholesky
    off, shift = _shift(factor, mean_gram)
    assert off < 1e-12 and shift == pytest.approx(1e-3, rel=1e-3)


def test_negative_definite_gram_names_the_problem():
    stats = _stats(16, 100)
    stats.gram = -stats.gram
    with pytest.raises(InvalidInputError, match="Whitening failed"):
        whitening_scaling(stats)


def test_shared_scalings_consume_only_what_they_are_told():
    """q/k/v share one factor; the observer marked consumable gives up its Gram, the other keeps it."""
    qkv, down = _stats(32, 200), _stats(48, 200, seed=1)
    statistics = {"q": qkv, "k": qkv, "v": qkv, "down": down}
    scalings = shared_scalings("whiten", statistics, list(statistics), 0.5, "abs_mean", consume=lambda s: s is down)
    assert scalings["q"] is scalings["k"] is scalings["v"]
    assert qkv.gram is not None and down.gram is None

