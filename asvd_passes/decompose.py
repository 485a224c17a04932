"""Scaled SVD of one projection and its truncation into ``down``/``up`` factors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scaling import Scaling


@dataclass
class ScaledSVD:
    """SVD of W·S = U·diag(σ)·Vᵀ for one projection, kept so any rank can be cut from it."""

    u: torch.Tensor  # out × k
    sigma: torch.Tensor  # k
    vh: torch.Tensor  # k × in
    scaling: Scaling

    @classmethod
    def of(cls, weight: torch.Tensor, scaling: Scaling) -> "ScaledSVD":
        scaled = scaling.apply(weight.detach().to(torch.float64))
        u, sigma, vh = torch.linalg.svd(scaled, full_matrices=False)
        return cls(u, sigma, vh, scaling)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``down`` (rank × in) = √Σ·Vᵀ·S⁻¹ and ``up`` (out × rank) = U·√Σ, in float64."""
        if not 1 <= rank <= self.sigma.numel():
            raise ValueError(f"rank {rank} outside [1, {self.sigma.numel()}]")
        root = self.sigma[:rank].sqrt()
        down = self.scaling.unapply(root[:, None] * self.vh[:rank])
        up = self.u[:, :rank] * root[None, :]
        return down, up
