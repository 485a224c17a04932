"""Block quantization on ONNX Runtime's MatMulNBits grid, bit for bit, in PyTorch.

ORT's quantizer (``MatMulNBitsQuantizer``, QOperator format, asymmetric) calls MLAS's
``BlockwiseQuantizer`` (``core/mlas/lib/q4_dq.cpp``): for the ONNX weight B (K × N) every column is
cut into blocks of ``block_size`` consecutive rows (blocks along K, the input dimension; K padded with
zeros to a multiple of the block). Per block, in float32:

    min ← min(min(block), 0), max ← max(max(block), 0)
    scale ← (max − min) / (2^bits − 1)
    zero point ← roundf(−min / scale) clamped to [0, 2^bits − 1] (0 when scale = 0)
    code ← clamp(roundf(v · (1 / scale) + zero point), 0, 2^bits − 1)      (1/scale = 0 when scale = 0)

and MatMulNBits dequantizes ``(code − zero point) · scale``. ``roundf`` rounds halves away from zero
(``torch.round`` rounds them to even, so it is not used). A torch ``Linear`` weight W (N × K) is Bᵀ,
so here blocks run along each row of W. Everything below reproduces those float32 operations one by
one, and :func:`packed` writes MatMulNBits' initializers: codes (N, blocks, block·bits/8), 8/bits
per byte with the first row in the lowest bits, scales (N, blocks), zero points (N, blocks) at 8 bits
or packed 8/bits per byte at 2 and 4 bits, the last byte's unused slots at the mid value 2^(bits−1),
padding codes 0.

Block offsets (optional): a float c per block added after dequantization, (code − zero point) · scale + c.
They give a block the grid min + scale · {0 … 2^bits − 1} of its own minimum and maximum, i.e. a
*fractional* zero point (GGUF's Q4_1/Q5_1 and HQQ store exactly that). MatMulNBits' float zero points
would say the same, but ORT 1.32's CPU kernel dequantizes the whole matrix on every call with them
(~1,550 µs against ~35 µs for one 1536 × 576 decode product: benchmarks/results/zero_points.md); the
export instead adds Σ_block(x) · c as one small MatMul beside the integer-zero-point MatMulNBits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidInputError

BITS = (2, 4, 8)


def check_grid(bits: int, block_size: int) -> None:
    """Clear errors for a bit width or block size MatMulNBits does not take, before any work."""
    if bits not in BITS:
        raise InvalidInputError(f"bits must be one of {BITS} for MatMulNBits, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise InvalidInputError(f"block size must be a power of two ≥ 16 for MatMulNBits, got {block_size}")


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's ``roundf``: to the nearest integer, halves away from zero (``x − trunc(x)`` is exact in float)."""
    whole = x.trunc()
    return whole + torch.where((x - whole).abs() >= 0.5, x.sign(), torch.zeros_like(x))


def block_parameters(block: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``block`` (…, block_size), float32 as MLAS computes them."""
    top = float(2**bits - 1)
    block = block.float()
    low = block.amin(-1).clamp_max(0.0)
    high = block.amax(-1).clamp_min(0.0)
    scale = (high - low) / top
    zero_fp = torch.where(scale != 0, 0.0 - low / torch.where(scale != 0, scale, 1.0), low)
    zero = round_half_away(zero_fp.clamp(0.0, top))  # values outside [0, top] clamp to the ends, as MLAS
    return scale, zero


def quantize_values(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``values`` (…, n) on the grid (scale, zero) given per row (…,): MLAS's float32 expression."""
    reciprocal = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, 1.0), 0.0)
    scaled = values.float() * reciprocal[..., None]  # rounded to float32 before the add, as in C without FMA
    return round_half_away(scaled + zero[..., None]).clamp(0.0, float(2**bits - 1))


def offset_parameters(block: torch.Tensor, bits: int):
    """Per row of ``block`` (…, b), the grid spanning exactly [min, max]: (scale, fractional zero point
    −min / scale, which codes are rounded against, its integer part clamped to the code range, which
    MatMulNBits gets, and the offset (integer − fractional) · scale that restores the rest; a constant
    block is all offset)."""
    top = float(2**bits - 1)
    block = block.float()
    low, high = block.amin(-1), block.amax(-1)
    scale = (high - low) / top
    fraction = torch.where(scale != 0, 0.0 - low / torch.where(scale != 0, scale, 1.0), 0.0)
    zero = round_half_away(fraction).clamp(0.0, top)
    return scale, fraction, zero, torch.where(scale != 0, (zero - fraction) * scale, low)


@dataclass
class BlockQuantized:
    """One matrix (N × K, a ``Linear`` weight) on a MatMulNBits grid: codes, per-block scales and zero points,
    and optionally a float offset per block (module docstring)."""

    codes: torch.Tensor        # (N, K) uint8
    scales: torch.Tensor       # (N, blocks) float32
    zero_points: torch.Tensor  # (N, blocks) uint8
    bits: int
    block_size: int
    offsets: torch.Tensor | None = None  # (N, blocks) float32, added to each dequantized block

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight MatMulNBits computes with: (code − zero point) · scale."""
        n, k = self.shape
        codes = _pad(self.codes.float(), self.block_size).view(n, -1, self.block_size)
        weight = (codes - self.zero_points.float()[..., None]) * self.scales[..., None]
        if self.offsets is not None:
            weight = weight + self.offsets[..., None]
        return weight.reshape(n, -1)[:, :k]

    def nbytes(self) -> int:
        """Bytes the export writes for this matrix: MatMulNBits' initializers (packed codes, float32 scales,
        packed zero points) and the float32 block offsets."""
        offsets = 0 if self.offsets is None else self.offsets.numel() * 4
        return sum(array.nbytes for array in packed(self)) + offsets


def _pad(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    k = weight.shape[-1]
    return torch.nn.functional.pad(weight, (0, -k % block_size))


def quantize_rtn(weight: torch.Tensor, bits: int, block_size: int, offsets: bool = False) -> BlockQuantized:
    """Round to nearest on MatMulNBits' grid: the codes, scales and zero points ORT's quantizer writes; with
    ``offsets``, on each block's own [min, max] grid instead (a fractional zero point, module docstring)."""
    check_grid(bits, block_size)
    n, k = weight.shape
    if not offsets:
        blocks = _pad(weight.detach().float().cpu(), block_size).view(n, -1, block_size)
        scale, zero = block_parameters(blocks, bits)
        codes = quantize_values(blocks, scale, zero, bits).reshape(n, -1)[:, :k]
        return BlockQuantized(codes.to(torch.uint8), scale, zero.to(torch.uint8), bits, block_size)
    rows = weight.detach().float().cpu()
    parts = [offset_quantized(rows[:, start:start + block_size], bits) for start in range(0, k, block_size)]
    return BlockQuantized(torch.cat([p[0] for p in parts], 1), *(torch.stack([p[i] for p in parts], 1)
                                                                 for i in (1, 2)),
                          bits, block_size, torch.stack([p[3] for p in parts], 1))


def offset_quantized(block: torch.Tensor, bits: int):
    """(codes, scale, integer zero point (uint8), offset) of one block column range (N, ≤ block_size),
    rounded on its own [min, max] grid."""
    scale, fraction, zero, offset = offset_parameters(block, bits)
    codes = quantize_values(block, scale, fraction, bits)
    return codes.to(torch.uint8), scale, zero.to(torch.uint8), offset


def from_grid(weight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, bits: int,
              block_size: int, offsets: torch.Tensor | None = None) -> BlockQuantized:
    """The codes of a weight that already lies on the grid (scales, zero points, offsets); refuses one that
    does not."""
    n, k = weight.shape
    blocks = _pad(weight.detach().float().cpu(), block_size).view(n, -1, block_size)
    if offsets is not None:
        blocks = blocks - offsets.float()[..., None]
    codes = quantize_values(blocks, scales.float(), zero_points.float(), bits).reshape(n, -1)[:, :k]
    result = BlockQuantized(codes.to(torch.uint8), scales.float(), zero_points.to(torch.uint8), bits, block_size,
                            None if offsets is None else offsets.float())
    if not torch.equal(result.dequantize(), weight.detach().float().cpu()):
        raise InvalidInputError("a weight recorded as quantized no longer lies on its grid (was it changed or cast?)")
    return result


def packed(quantized: BlockQuantized):
    """MatMulNBits' three initializers as numpy arrays: codes (N, blocks, blob), scales (N, blocks), zero points."""
    n, k = quantized.shape
    size, bits = quantized.block_size, quantized.bits
    zero = quantized.zero_points.to(torch.int32)
    blocks = zero.shape[1]
    # Rows padding the last block are left 0 (ORT's quantizer writes only the K real rows).
    codes = torch.nn.functional.pad(quantized.codes.to(torch.int32), (0, blocks * size - k))
    scales = quantized.scales.float().contiguous()
    if bits == 8:
        return (codes.to(torch.uint8).view(n, blocks, size).numpy(), scales.numpy(), zero.to(torch.uint8).numpy())
    per = 8 // bits  # values per byte, the first in the lowest bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    data = (codes.view(n, blocks, size // per, per) << shifts).sum(-1).to(torch.uint8)
    if blocks % per:  # the last byte's unused zero points hold the mid value, as ORT writes them
        zero = torch.cat([zero, torch.full((n, -blocks % per), 2 ** (bits - 1), dtype=torch.int32)], 1)
    return data.numpy(), scales.numpy(), (zero.view(n, -1, per) << shifts).sum(-1).to(torch.uint8).numpy()
