"""The scaled SVD in float64 (eigendecomposition of the smaller Gram matrix) and float32 (a real SVD)."""

from __future__ import annotations

import pytest
import torch

from asvd_passes import ASVDConfig
from asvd_passes.decompose import ScaledSVD
from asvd_passes.errors import InvalidInputError
from asvd_passes.graph.observers import InputStatistics
from asvd_passes.scaling import whitening_scaling


@pytest.mark.parametrize("shape", [(48, 96), (96, 48)], ids=["wide", "tall"])
def test_float32_svd_truncates_like_float64(shape):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator)
    stats = InputStatistics(shape[1], ("gram",), ("x",))
    stats(torch.randn(400, shape[1], generator=generator) * torch.linspace(0.1, 3.0, shape[1]))
    scaling = whitening_scaling(stats)
    exact, single = ScaledSVD.of(weight, scaling), ScaledSVD.of(weight, scaling, torch.float32)
    assert single.u.dtype == torch.float64  # factors come back in float64 whatever the SVD ran in
    assert torch.allclose(single.sigma, exact.sigma, rtol=1e-4)
    for rank in (8, 24):
        down, up = exact.factors(rank)
        down32, up32 = single.factors(rank)
        truncated, truncated32 = up @ down, up32 @ down32
        assert (truncated32 - truncated).norm() / truncated.norm() < 1e-4


def test_unknown_svd_dtype_is_named():
    with pytest.raises(InvalidInputError, match="svd_dtype"):
        ASVDConfig(svd_dtype="float16")

