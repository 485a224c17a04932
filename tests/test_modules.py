"""``LowRankLinear``'s two storage forms hold the same matrix; the interpolative one in r² fewer parameters."""

from __future__ import annotations

import pytest
import torch

import asvd_passes as ap
from asvd_passes.modules import interpolative_factors


def _factors(out_features, in_features, rank, seed=0):
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, in_features, generator=generator, dtype=torch.float64)
    up = torch.randn(out_features, rank, generator=generator, dtype=torch.float64)
    return down, up


@pytest.mark.parametrize("out_features, in_features, rank", [(64, 32, 10), (32, 64, 31), (50, 7, 6), (96, 96, 1)])
def test_interpolative_form_is_the_same_matrix(out_features, in_features, rank):
    down, up = _factors(out_features, in_features, rank)
    bias = torch.randn(out_features, dtype=torch.float64)
    pair = ap.LowRankLinear.from_factors(down, up, bias, torch.float64, "cpu")
    module = ap.LowRankLinear.from_factors(down, up, bias, torch.float64, "cpu", interpolative=True)
    assert module.interpolative and not pair.interpolative
    torch.testing.assert_close(module.weight, up @ down)
    x = torch.randn(3, 5, in_features, dtype=torch.float64)
    torch.testing.assert_close(module(x), pair(x))
    params = sum(p.numel() for p in module.parameters())
    assert params == rank * (in_features + out_features - rank) + out_features  # + the bias
    assert sum(p.numel() for p in pair.parameters()) - params == rank * rank
    # The skeleton rows are rows of the matrix itself; maxvol bounds the coefficients.
    skeleton, coefficients, rows = interpolative_factors(down, up)
    assert sorted(rows.tolist()) == list(range(out_features))
    assert coefficients.abs().max() <= 1.05 + 1e-12
    torch.testing.assert_close(skeleton, (up @ down)[rows.argsort()[:rank]])


def test_rank_deficient_factors_stay_exact():
    down, up = _factors(40, 24, 8, seed=3)
    up[:, 5:] = 0  # dead directions (a whitened SVD's zero singular values)
    module = ap.LowRankLinear.from_factors(down, up, None, torch.float64, "cpu", interpolative=True)
    torch.testing.assert_close(module.weight, up @ down)
    assert torch.isfinite(module.up.weight).all()


def test_full_output_rank_keeps_the_pair():
    """At r = out the interpolative form would save nothing (and leave ``up`` empty): two factors stay."""
    down, up = _factors(16, 32, 16)
    module = ap.LowRankLinear.from_factors(down, up, None, torch.float32, "cpu", interpolative=True)
    assert not module.interpolative and module.up.weight.shape == (16, 16)


def test_interpolative_module_exports_to_onnx(tmp_path):
    """The gather that orders the outputs is a plain ONNX Gather: ONNX Runtime runs the exported module."""
    import onnxruntime as ort

    down, up = _factors(24, 16, 6)
    module = ap.LowRankLinear.from_factors(down, up, torch.randn(24), torch.float32, "cpu", interpolative=True)
    x = torch.randn(2, 3, 16)
    path = tmp_path / "lowrank.onnx"
    torch.onnx.export(module, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), module(x).detach(), rtol=1e-5, atol=1e-5)
