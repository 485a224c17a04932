"""Closed-form refit of a factored projection's ``up`` after truncation (SVD-LLM's local update).

Given the kept ``down`` (r × in), the compressed-path inputs X_c and the dense-path inputs X_d of
the same projection, choose ``up`` to minimise ‖W·X_d − up·down·X_c‖²: the factored projection,
fed what the already-compressed blocks before it produce, reproduces what the dense projection
produced from the dense inputs. With G = Σ x_c·x_cᵀ and C = Σ x_d·x_cᵀ the normal equations give
up = W·C·downᵀ·(down·G·downᵀ)⁻¹: only input moments are needed, never the activations themselves.
"""

from __future__ import annotations

import torch


def refit_up(weight: torch.Tensor, down: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, ridge: float = 1e-8) -> torch.Tensor:
    """The least-squares ``up`` (out × r), float64. ``cross`` = Σ x_d x_cᵀ, ``gram`` = Σ x_c x_cᵀ."""
    weight, down = weight.double(), down.double()
    inner = down @ gram.to(down.device) @ down.T  # r × r, symmetric positive semi-definite
    target = weight @ cross.to(down.device) @ down.T  # out × r
    # A tiny ridge, relative to the spectrum's scale, keeps the solve defined for dead directions.
    inner = inner + ridge * inner.diagonal().mean().clamp_min(1e-30) * torch.eye(inner.shape[0], dtype=inner.dtype, device=inner.device)
    return torch.linalg.solve(inner, target.T).T
