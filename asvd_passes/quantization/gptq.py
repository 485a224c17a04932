"""GPTQ (Frantar et al., arXiv 2210.17323) on MatMulNBits' grid, against a matrix's input Gram matrix.

Columns of W (N × K) are rounded left to right; each rounding error is spread over the columns not
yet rounded through the upper Cholesky factor of H⁻¹ (H = XᵀX, damped), which minimises ‖(W − Q)X‖
column by column. Each block's scale and zero point are taken, as GPTQ with ``groupsize`` does, from
the error-updated weights when the block is reached; the rounding is :mod:`.matmul_nbits`' own, so
the result lies exactly on the grid ORT dequantizes.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInputError
from .matmul_nbits import BlockQuantized, block_parameters, check_grid, offset_parameters, quantize_values

DAMPING = 0.01  # of the mean diagonal of H, as in GPTQ


def inverse_factor(gram: torch.Tensor, damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of (H + λI)⁻¹, dead inputs), H in float64; λ = ``damping`` · mean diag H.

    An input that never fired (zero diagonal) gets a unit diagonal so H stays invertible; its weights
    do not matter to the output and are rounded as they are.
    """
    h = gram.detach().to(torch.float64).clone()
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise InvalidInputError(f"GPTQ needs a square Gram matrix, got shape {tuple(h.shape)}")
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * h.diagonal().mean())
    for attempt in range(6):  # a Gram matrix estimated from few tokens can be numerically singular
        lower, info = torch.linalg.cholesky_ex(h)
        if not info:
            break
        h.diagonal().add_(damping * 10**attempt * h.diagonal().mean())
    else:
        raise InvalidInputError("GPTQ: the damped Gram matrix is not positive definite; use more calibration data")
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True), dead


SHRINKS = tuple(1.0 - 0.05 * i for i in range(8))  # candidate ranges: min/max × 1.0, 0.95, …, 0.65


def clipped_parameters(block: torch.Tensor, importance: torch.Tensor, bits: int,
                       shrinks=SHRINKS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``block`` (n, b): the scale and zero point, among MLAS's rule applied to min/max shrunk by
    each factor in ``shrinks``, whose rounding error Σ importance·(w − q)² is least (GPTQ's ``mse`` option).

    MatMulNBits dequantizes any (scale, zero point); only how they are chosen differs from ORT's.
    """
    best_error = best_scale = best_zero = None
    for shrink in shrinks:
        scale, zero = block_parameters(block * shrink, bits)
        codes = quantize_values(block, scale, zero, bits)
        error = (((codes - zero[:, None]) * scale[:, None] - block) ** 2 * importance).sum(-1)
        if best_error is None:
            best_error, best_scale, best_zero = error, scale, zero
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def gptq(weight: torch.Tensor, gram: torch.Tensor, bits: int, block_size: int,
         damping: float = DAMPING, clip: bool = True, offsets: bool = False) -> BlockQuantized:
    """Quantize ``weight`` (N × K) to MatMulNBits' grid, minimising ‖(W − Q)X‖ for XᵀX = ``gram`` (K × K).

    ``clip``: each block's range is searched (:func:`clipped_parameters`, weighted by diag H) instead of
    taken from its min and max as ORT's round-to-nearest does. ``offsets``: each block's grid spans its
    own [min, max] (a fractional zero point kept as a block offset, :func:`.offset_parameters`; no search).
    """
    check_grid(bits, block_size)
    n, k = weight.shape
    if gram.shape != (k, k):
        raise InvalidInputError(f"GPTQ: Gram matrix {tuple(gram.shape)} does not match the weight's {k} inputs")
    factor, _ = inverse_factor(gram, damping)
    factor = factor.float()
    importance = gram.detach().diagonal().float().cpu()
    work = weight.detach().float().cpu().clone()
    codes = torch.empty(n, k, dtype=torch.uint8)
    scales, zeros, shifts = [], [], []
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        # The block's grid, from the weights as the earlier blocks' errors left them (zeros pad a short block).
        shift = torch.zeros(n)
        if offsets:
            scale, fraction, zero, shift = offset_parameters(work[:, start:end], bits)
        elif clip:
            scale, zero = clipped_parameters(work[:, start:end], importance[start:end], bits)
        else:
            scale, zero = block_parameters(work[:, start:end], bits)
        scales.append(scale)
        zeros.append(zero)
        shifts.append(shift)
        errors = torch.empty(n, end - start)
        for column in range(start, end):
            values = work[:, column]
            code = quantize_values(values[:, None], scale, fraction if offsets else zero, bits)[:, 0]
            codes[:, column] = code.to(torch.uint8)
            rounded = (code - zero) * scale + shift
            error = (values - rounded) / factor[column, column]
            errors[:, column - start] = error
            # Within the block, column by column; the later blocks take the whole block's error at once.
            work[:, column + 1:end] -= error[:, None] * factor[column, column + 1:end][None, :]
        work[:, end:] -= errors @ factor[start:end, end:]
    return BlockQuantized(codes, torch.stack(scales, 1), torch.stack(zeros, 1).to(torch.uint8), bits, block_size,
                          torch.stack(shifts, 1) if offsets else None)


def output_error(weight: torch.Tensor, quantized: BlockQuantized, gram: torch.Tensor) -> float:
    """‖(W − Q)X‖²_F = tr((W − Q) H (W − Q)ᵀ) for H = XᵀX."""
    delta = (weight.detach().double().cpu() - quantized.dequantize().double())
    return float(((delta @ gram.double()) * delta).sum())
