"""Activation scalings S: the W·S whose SVD truncation error tracks the output error.

Each scaling turns the observer statistics of a projection's input into an invertible S, gives
``W @ S`` for the SVD and folds ``S⁻¹`` back into the ``down`` factor. All in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidInputError
from .graph.observers import InputStatistics


class Scaling:
    """Identity scaling (plain SVD)."""

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """W ↦ W·S."""
        return weight

    def unapply(self, factor: torch.Tensor) -> torch.Tensor:
        """M ↦ M·S⁻¹ (M has ``in`` columns)."""
        return factor


@dataclass
class DiagonalScaling(Scaling):
    """ASVD: S = diag(s) with s_j = stat_j ** alpha (stat = mean or max |x_j|)."""

    diag: torch.Tensor

    def apply(self, weight):
        return weight * self.diag[None, :]

    def unapply(self, factor):
        return factor / self.diag[None, :]


@dataclass
class WhiteningScaling(Scaling):
    """SVD-LLM: S = L with L·Lᵀ = XᵀX (lower Cholesky factor), so ‖(W−Ŵ)Xᵀ‖ = ‖(W−Ŵ)L‖."""

    cholesky: torch.Tensor

    def apply(self, weight):
        return weight @ self.cholesky

    def unapply(self, factor):
        # M·L⁻¹ = (L⁻ᵀ·Mᵀ)ᵀ: one triangular solve, no explicit inverse.
        return torch.linalg.solve_triangular(self.cholesky.T, factor.T, upper=True).T


def asvd_scaling(stats: InputStatistics, alpha: float, statistic: str = "abs_mean") -> DiagonalScaling:
    values = stats.abs_mean() if statistic == "abs_mean" else stats.abs_max.double()
    # A channel that never fired would make S singular; give it the smallest positive scale seen.
    positive = values[values > 0]
    floor = positive.min() if positive.numel() else torch.tensor(1.0, dtype=values.dtype)
    return DiagonalScaling(values.clamp_min(floor).pow(alpha))


def whitening_scaling(stats: InputStatistics, max_tries: int = 8) -> WhiteningScaling:
    """Cholesky factor of the (mean) Gram matrix, shifting the diagonal until it is positive definite.

    Memory matters at 5632² and beyond: the factor is computed in place in the one working copy
    (Cholesky reads only the lower triangle, which Σ xᵀx fills symmetrically, so no symmetrised
    copy is made), and a rank-deficient Gram (fewer calibration tokens than features, or dead
    channels) is shifted by growing multiples of its mean diagonal rather than by its smallest
    eigenvalue, which would cost another n² copy and an eigendecomposition.
    """
    count = max(stats.count, 1)
    scale = (stats.gram.diagonal().abs().mean() / count).item() or 1.0
    info = torch.empty((), dtype=torch.int32, device=stats.gram.device)
    factor = None
    for attempt in range(max_tries):
        factor = torch.div(stats.gram, count, out=factor)  # fresh copy of the mean Gram, same buffer each try
        if attempt:
            factor.diagonal().add_(scale * 1e-6 * 10 ** (attempt - 1))
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if info.item() == 0:
            return WhiteningScaling(factor)
    raise InvalidInputError(
        "Whitening failed: the Gram matrix stays non positive definite even after a diagonal shift; "
        "use more calibration data or --method asvd"
    )


def build_scaling(method: str, stats: InputStatistics | None, alpha: float, statistic: str) -> Scaling:
    if method == "svd":
        return Scaling()
    if stats is None:
        raise ValueError(f"method {method!r} needs calibration statistics")
    if method == "asvd":
        return asvd_scaling(stats, alpha, statistic)
    if method == "whiten":
        return whitening_scaling(stats)
    raise ValueError(f"Unknown method {method!r}")


def shared_scalings(method: str, statistics: dict, names, alpha: float, statistic: str) -> dict[str, Scaling]:
    """One scaling per distinct observer: q/k/v (or gate/up) read one input, so they share one S (one Cholesky)."""
    built: dict[int, Scaling] = {}
    scalings = {}
    for name in names:
        stats = statistics.get(name)
        key = id(stats)
        if key not in built:
            built[key] = build_scaling(method, stats, alpha, statistic)
        scalings[name] = built[key]
    return scalings
