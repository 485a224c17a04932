"""Scaled SVD of one projection and its truncation into ``down``/``up`` factors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scaling import Scaling


@dataclass
class ScaledSVD:
    """SVD of W·S = U·diag(σ)·Vᵀ for one projection, kept so any rank can be cut from it.

    With ``output_root`` R (lower triangular, R·Rᵀ = the output metric G) it is the SVD of Rᵀ·W·S,
    and ``up`` is mapped back by R⁻ᵀ: truncation then minimises E[δyᵀ·G·δy] instead of E[‖δy‖²].
    """

    u: torch.Tensor  # out × k
    sigma: torch.Tensor  # k
    vh: torch.Tensor  # k × in
    scaling: Scaling
    output_root: torch.Tensor | None = None  # out × out, lower triangular

    @classmethod
    def of(cls, weight: torch.Tensor, scaling: Scaling, output_root: torch.Tensor | None = None) -> "ScaledSVD":
        """SVD of W·S; in float64 through the eigendecomposition of its smaller Gram matrix.

        A = W·S is out × in; the eigenvectors of A·Aᵀ (or AᵀA) give U (or V) and σ², and one
        product gives the other side. On CPU this is ~6× faster than LAPACK's SVD of A at
        2048×5632 and needs no SVD workspace; in float64 the squared condition number still leaves
        the singular values that a truncation keeps accurate (relative error ~1e-16·σ₁²/σ_k²).
        """
        weight = weight.detach().to(torch.float64)
        if output_root is not None:
            weight = output_root.to(weight.device, torch.float64).T @ weight
        scaled = scaling.apply(weight)
        del weight
        out_features, in_features = scaled.shape
        if out_features <= in_features:
            eigenvalues, u = torch.linalg.eigh(scaled @ scaled.T)
            u = u.flip(1)
            sigma = eigenvalues.flip(0).clamp_min(0).sqrt()
            vh = (u.T @ scaled).div_(_safe(sigma)[:, None])  # rows σ_k·v_kᵀ, normalised (in place: out × in)
        else:
            eigenvalues, v = torch.linalg.eigh(scaled.T @ scaled)
            v = v.flip(1)
            sigma = eigenvalues.flip(0).clamp_min(0).sqrt()
            u = (scaled @ v).div_(_safe(sigma)[None, :])
            vh = v.T
        return cls(u, sigma, vh, scaling, output_root)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``down`` (rank × in) = √Σ·Vᵀ·S⁻¹ and ``up`` (out × rank) = U·√Σ (R⁻ᵀ·U·√Σ), in float64."""
        if not 1 <= rank <= self.sigma.numel():
            raise ValueError(f"rank {rank} outside [1, {self.sigma.numel()}]")
        root = self.sigma[:rank].sqrt()
        down = self.scaling.unapply(root[:, None] * self.vh[:rank])
        up = self.u[:, :rank] * root[None, :]
        if self.output_root is not None:
            up = torch.linalg.solve_triangular(self.output_root.to(up.device, up.dtype).T, up, upper=True)
        return down, up


def _safe(sigma: torch.Tensor) -> torch.Tensor:
    """σ with (numerically) zero values lifted, so dividing by it never makes inf: those directions carry ~0."""
    floor = sigma.max().clamp_min(1e-300) * torch.finfo(sigma.dtype).eps
    return sigma.clamp_min(floor)


def output_root(covariance: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower-triangular R with R·Rᵀ = G + damping·mean(diag G)·I (G from a few windows is rank-deficient)."""
    g = covariance.to(torch.float64)
    shift = damping * g.diagonal().mean().clamp_min(1e-30)
    damped = g + shift * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    root, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        raise ValueError(f"the damped output-gradient covariance is not positive definite (damping {damping})")
    return root
