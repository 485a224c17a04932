"""GPTQ on MatMulNBits' grid: lower output error than round-to-nearest, codes on the grid."""

from __future__ import annotations

import pytest
import torch

from asvd_passes.errors import InvalidInputError
from asvd_passes.quantization import from_grid, quantize_rtn
from asvd_passes.quantization.gptq import gptq, output_error


def _layer(n: int = 48, k: int = 128, tokens: int = 512, seed: int = 0):
    """A weight and correlated inputs with unequal channel scales (what makes GPTQ pay off)."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=generator) / k**0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=generator) @ mix * torch.linspace(0.1, 3.0, k)
    return torch.randn(n, k, generator=generator), x.double().T @ x.double()


@pytest.mark.parametrize("bits,block_size", [(4, 32), (4, 64), (8, 32)])
def test_gptq_beats_rtn_on_the_same_grid(bits, block_size):
    weight, gram = _layer()
    ours = gptq(weight, gram, bits, block_size)
    rtn = quantize_rtn(weight, bits, block_size)
    assert output_error(weight, ours, gram) < 0.85 * output_error(weight, rtn, gram)
    # Every block's codes, scale and zero point form a MatMulNBits grid that reproduces the weights exactly.
    on_grid = from_grid(ours.dequantize(), ours.scales, ours.zero_points, bits, block_size)
    assert torch.equal(on_grid.codes, ours.codes)
    assert int(ours.codes.max()) <= 2**bits - 1


def test_gptq_with_an_identity_gram_is_rtn():
    """With no input correlation there is no error to spread: the codes (min/max ranges) are round-to-nearest's."""
    weight, _ = _layer(k=64)
    assert torch.equal(gptq(weight, torch.eye(64, dtype=torch.float64), 4, 32, damping=0.0, clip=False).codes,
                       quantize_rtn(weight, 4, 32).codes)


def test_dead_inputs_and_bad_shapes():
    weight, gram = _layer(k=64)
    gram[5, :] = 0
    gram[:, 5] = 0
    assert torch.isfinite(gptq(weight, gram, 4, 32).dequantize()).all()
    with pytest.raises(InvalidInputError, match="does not match"):
        gptq(weight, gram[:32, :32], 4, 32)


def test_searched_ranges_lower_the_error_and_stay_on_a_grid():
    weight, gram = _layer(k=128)
    weight = weight + 0.3 * weight**3  # heavy tails: min/max ranges waste levels
    searched, plain = gptq(weight, gram, 4, 64), gptq(weight, gram, 4, 64, clip=False)
    assert output_error(weight, searched, gram) < output_error(weight, plain, gram)
    assert torch.equal(from_grid(searched.dequantize(), searched.scales, searched.zero_points, 4, 64).codes,
                       searched.codes)


def test_gptq_with_block_offsets_beats_rtn_with_them():
    """GPTQ on each block's own [min, max] grid: lower output error than rounding to that grid, and on it."""
    weight, gram = _layer()
    ours, rtn = gptq(weight, gram, 4, 32, offsets=True), quantize_rtn(weight, 4, 32, offsets=True)
    assert ours.offsets is not None
    assert output_error(weight, ours, gram) < 0.85 * output_error(weight, rtn, gram)
    again = from_grid(ours.dequantize(), ours.scales, ours.zero_points, 4, 32, ours.offsets)
    assert torch.equal(again.codes, ours.codes)
