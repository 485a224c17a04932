"""``fisher`` allocation: closed-form output error per rank, weighted by loss sensitivity, global greedy.

For projection p with scaled SVD W·S = Σ σ_k u_k v_kᵀ, cutting it to rank r changes the output by
δy = Σ_{k>r} σ_k u_k (m_k·x) with m_k = v_kᵀS⁻¹. With g = ∂loss/∂y and the diagonal Fisher
F = diag(E[g²]), the expected loss increase is about ½·Σ_{k>r} σ_k² · (m_k G m_kᵀ) · (u_kᵀ F u_k)
(G = E[x xᵀ]; exact in the error term for whitening, where m_k G m_kᵀ = 1 and the m_k·x are
uncorrelated). Only F needs forward/backward passes; every rank's cost then comes from the spectrum.
"""

from __future__ import annotations

import torch

from ..decompose import ScaledSVD
from ..ranks import ProjectionShape, RankPlan
from ..scaling import WhiteningScaling
from .budget import greedy_plan


def loss_cost_curve(svd: ScaledSVD, fisher: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """``curve[r]`` = predicted loss increase when keeping rank r (curve[max_rank] = 0).

    For an SVD whitened on the output side by the gradient covariance (``svd.output_root``) the
    discarded σ_k² already are loss units: ½·E[δyᵀ·G·δy] summed over directions (the ½ is common to all).
    """
    energy = svd.sigma.pow(2)
    if svd.output_root is not None:
        output_weight = torch.ones_like(energy)  # the SVD already weighs outputs by the loss metric
    else:
        weighted = svd.u * fisher.to(svd.u.device, svd.u.dtype).sqrt()[:, None]  # one out × k temporary
        output_weight = weighted.mul_(weighted).sum(0)  # u_kᵀ F u_k
        del weighted
    if gram is not None and not isinstance(svd.scaling, WhiteningScaling):
        directions = svd.scaling.unapply(svd.vh)  # rows m_k = v_kᵀ S⁻¹
        input_weight = ((directions @ gram.to(directions.device)) * directions).sum(1)  # m_k G m_kᵀ
    else:
        input_weight = torch.ones_like(energy)
    terms = energy * output_weight * input_weight
    tail = torch.flip(torch.cumsum(torch.flip(terms, [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)])


def fisher_plan(
    shapes: dict[str, ProjectionShape],
    svds: dict[str, ScaledSVD],
    fisher: dict[str, torch.Tensor],
    grams: dict[str, torch.Tensor | None],
    ratio: float,
    multiple: int,
) -> RankPlan:
    curves = {name: loss_cost_curve(svds[name], fisher[name], grams.get(name)).tolist() for name in shapes}
    return greedy_plan(shapes, lambda name, rank: curves[name][min(rank, len(curves[name]) - 1)], ratio, multiple)
