"""The scaled SVD in float64 (eigendecomposition of the smaller Gram matrix), plain and output-whitened."""

from __future__ import annotations

import pytest
import torch

from asvd_passes import ASVDConfig
from asvd_passes.decompose import ScaledSVD
from asvd_passes.errors import InvalidInputError
from asvd_passes.graph.observers import InputStatistics
from asvd_passes.scaling import whitening_scaling


@pytest.mark.parametrize("shape", [(48, 96), (96, 48)], ids=["wide", "tall"])
def test_eigh_svd_truncates_like_lapack_svd(shape):
    """The float64 SVD through the smaller Gram matrix's eigendecomposition gives LAPACK's σ and truncations."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator, dtype=torch.float64)
    stats = InputStatistics(shape[1], ("gram",), ("x",))
    stats(torch.randn(400, shape[1], generator=generator) * torch.linspace(0.1, 3.0, shape[1]))
    scaling = whitening_scaling(stats)
    svd = ScaledSVD.of(weight, scaling)
    u, sigma, vh = torch.linalg.svd(scaling.apply(weight), full_matrices=False)
    assert torch.allclose(svd.sigma, sigma, rtol=1e-10)
    for rank in (8, 24):
        down, up = svd.factors(rank)
        lapack = (u[:, :rank] * sigma[:rank]) @ vh[:rank]
        assert (scaling.apply(up.double() @ down.double()) - lapack).norm() / lapack.norm() < 1e-8


@pytest.mark.parametrize("shape", [(48, 96), (96, 48)], ids=["wide", "tall"])
def test_output_whitened_svd_minimises_the_metric_error(shape):
    """With R·Rᵀ = G, the rank-r factors minimise E[δyᵀ·G·δy] (= ‖Rᵀ·δW·L‖², L the input factor): the
    discarded σ² are that error exactly, it beats the input-only SVD's factors in this metric, and
    full rank gives W back."""
    from asvd_passes.decompose import output_root

    generator = torch.Generator().manual_seed(1)
    out_features, in_features = shape
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    stats = InputStatistics(in_features, ("gram",), ("x",))
    stats(torch.randn(500, in_features, generator=generator) * torch.linspace(0.1, 3.0, in_features))
    scaling = whitening_scaling(stats)
    gradients = torch.randn(300, out_features, generator=generator, dtype=torch.float64) * torch.linspace(
        0.05, 2.0, out_features, dtype=torch.float64)
    root = output_root(gradients.T @ gradients / 300, damping=0.1)
    weighted, plain = ScaledSVD.of(weight, scaling, output_root=root), ScaledSVD.of(weight, scaling)

    def metric_error(down, up):
        return (root.T @ (weight - up @ down) @ scaling.cholesky).pow(2).sum()

    for rank in (6, 20):
        error = metric_error(*weighted.factors(rank))
        torch.testing.assert_close(error, weighted.sigma[rank:].pow(2).sum(), rtol=1e-8, atol=1e-10)
        assert error < 0.95 * metric_error(*plain.factors(rank))
    down, up = weighted.factors(min(shape))
    torch.testing.assert_close(up @ down, weight, rtol=0, atol=1e-9)


def test_output_whitening_options_are_checked():
    with pytest.raises(InvalidInputError, match="output_whitening"):
        ASVDConfig(output_whitening="hessian")
    with pytest.raises(InvalidInputError, match="output_damping"):
        ASVDConfig(output_whitening="gradient", output_damping=0)
