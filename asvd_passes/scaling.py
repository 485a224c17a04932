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


def whitening_scaling(stats: InputStatistics, max_tries: int = 8, consume: bool = False) -> WhiteningScaling:
    """Cholesky factor of the (mean) Gram matrix, shifting the diagonal until it is positive definite.

    Memory matters at 5632² and beyond, so the factor is computed in place in one n² buffer: the Gram
    matrix itself with ``consume`` (``stats.gram`` is then gone), else one copy of it. A rank-deficient
    Gram (fewer calibration tokens than features, or dead channels) is shifted by growing multiples
    of its mean diagonal rather than by its smallest eigenvalue, which would cost another n² copy and
    an eigendecomposition.
    """
    count = max(stats.count, 1)
    work = stats.gram.div_(count) if consume else stats.gram / count
    if consume:
        stats.gram = None
    scale = (work.diagonal().abs().mean()).item() or 1.0
    shifts = [0.0] + [scale * 1e-6 * 10**attempt for attempt in range(max_tries - 1)]
    factor = _cholesky_in_place(work, shifts)
    if factor is None:
        raise InvalidInputError(
            "Whitening failed: the Gram matrix stays non positive definite even after a diagonal shift; "
            "use more calibration data or --method asvd"
        )
    return WhiteningScaling(factor)


def _cholesky_in_place(matrix: torch.Tensor, shifts: list[float]) -> torch.Tensor | None:
    """Lower Cholesky factor of symmetric ``matrix`` (+ shift·I, the first shift that works), in its own storage.

    The factor is returned as ``matrix.mT``: LAPACK works on column-major data, and the transposed
    view of a row-major buffer is column-major, so nothing is copied. On the CPU, LAPACK's potrf
    (through SciPy, which unlike torch leaves the other triangle alone) overwrites only the lower
    triangle, so after a failed try the matrix is restored from its intact upper triangle and the
    saved diagonal; torch's own Cholesky zeroes that triangle, so elsewhere each try works on a copy.
    """
    column_major = matrix.mT
    if matrix.device.type != "cpu" or matrix.dtype not in (torch.float32, torch.float64):
        info = torch.empty((), dtype=torch.int32, device=matrix.device)
        original = matrix.clone() if len(shifts) > 1 else None
        for attempt, shift in enumerate(shifts):
            if attempt:
                matrix.copy_(original)
                matrix.diagonal().add_(shift)
            torch.linalg.cholesky_ex(column_major, out=(column_major, info))
            if info.item() == 0:
                return column_major
        return None

    from scipy.linalg import lapack

    potrf = lapack.dpotrf if matrix.dtype == torch.float64 else lapack.spotrf
    diagonal = matrix.diagonal().clone()
    array = column_major.numpy()  # Fortran-ordered view of the same memory
    for attempt, shift in enumerate(shifts):
        if attempt:
            _restore_lower(column_major, diagonal)
        if shift:
            column_major.diagonal().add_(shift)
        _, info = potrf(array, lower=1, overwrite_a=1, clean=0)
        if info == 0:
            return column_major.tril_()
    return None


def _restore_lower(matrix: torch.Tensor, diagonal: torch.Tensor, block: int = 512) -> None:
    """Copy the strict upper triangle onto the lower one and put the diagonal back (a few small temporaries)."""
    size = matrix.shape[0]
    for start in range(0, size, block):
        stop = min(start + block, size)
        matrix[stop:, start:stop] = matrix[start:stop, stop:].T
        square = matrix[start:stop, start:stop]
        square.copy_(square.triu(1) + square.triu(1).T)
    matrix.diagonal().copy_(diagonal)


def build_scaling(method: str, stats: InputStatistics | None, alpha: float, statistic: str,
                  consume: bool = False) -> Scaling:
    if method == "svd":
        return Scaling()
    if stats is None:
        raise ValueError(f"method {method!r} needs calibration statistics")
    if method == "asvd":
        return asvd_scaling(stats, alpha, statistic)
    if method == "whiten":
        return whitening_scaling(stats, consume=consume)
    raise ValueError(f"Unknown method {method!r}")


def shared_scalings(method: str, statistics: dict, names, alpha: float, statistic: str,
                    consume=lambda stats: False) -> dict[str, Scaling]:
    """One scaling per distinct observer: q/k/v (or gate/up) read one input, so they share one S (one Cholesky).

    ``consume(stats)`` says whether nothing reads that observer's Gram matrix after the scaling: its
    buffer then becomes the Cholesky factor (no n² copy; a 5632² Gram matrix is 254 MB of float64).
    """
    built: dict[int, Scaling] = {}
    scalings = {}
    for name in names:
        stats = statistics.get(name)
        key = id(stats)
        if key not in built:
            built[key] = build_scaling(method, stats, alpha, statistic, consume=stats is not None and consume(stats))
        scalings[name] = built[key]
    return scalings
