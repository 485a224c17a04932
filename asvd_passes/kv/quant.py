"""Quantized latent KV cache: the cached K/V latents stored as int8 or packed int4 with static scales.

Each latent channel c has a scale s_c and a zero point z_c, calibrated once on calibration data
(asymmetric range per channel, or one range for the whole latent with ``granularity="tensor"``;
for 4 bits the range is clipped where that lowers the squared error on the calibration rows).
Stored codes are ``q = saturate(round(x / s) + z)``, exactly ONNX ``QuantizeLinear`` (division,
round half to even), so the ONNX export reproduces them; they are read back as ``(q - z)·s``
(``DequantizeLinear``).

- 8 bits: int8 codes, one byte per latent number.
- 4 bits: codes 0..15 packed two per byte into uint8 (low nibble: even channel), the layout
  onnxruntime-genai uses for 4-bit caches; an odd width gets one padding nibble.

The latents are quantized wherever the cache would hold them, prefill included (the attention
always reads what a cache would give back), so perplexity over whole windows measures the cache.

Optionally (``rotate=True``) each head group's latent is first turned by a random orthogonal
matrix folded into ``down`` and ``up`` (Palu/QuaRot's idea: spread outlier channels), which leaves
the float model unchanged.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from ..config import KV_BITS, KV_QUANT_GRANULARITIES as GRANULARITIES
from ..errors import InvalidInputError

CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 … 0.5 of the calibrated range (4 bits only)
SAMPLE_ROWS = 256  # latent rows kept per calibration call for the clipping search


def check_bits(bits) -> None:
    if bits not in KV_BITS:
        raise InvalidInputError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))} (or None for a float cache), got {bits!r}")


class LatentQuantizer(nn.Module):
    """Static asymmetric quantizer of one latent (per channel scale and zero point, stored as buffers)."""

    # Set while exporting to ONNX: quantize/dequantize through torch's ``quantized_decomposed`` ops, which
    # the ONNX exporter writes as QuantizeLinear (+ Clip to the 4-bit range) and DequantizeLinear with the
    # scales and zero points as initializers. Eager PyTorch computes the same definition directly.
    onnx_ops = False

    def __init__(self, width: int, bits: int, device=None):
        super().__init__()
        check_bits(bits)
        self.width, self.bits = int(width), int(bits)
        self.register_buffer("scale", torch.ones(self.width, dtype=torch.float32, device=device))
        self.register_buffer("zero_point", torch.zeros(self.width, dtype=self.code_dtype, device=device))

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits == 8 else torch.uint8

    @property
    def code_range(self) -> tuple[int, int]:
        return (-128, 127) if self.bits == 8 else (0, 15)

    @property
    def stored_width(self) -> int:
        """Bytes per token the cache holds for this latent."""
        return self.width if self.bits == 8 else (self.width + 1) // 2

    def codes(self, latent: torch.Tensor) -> torch.Tensor:
        """QuantizeLinear: saturate(round(x / scale) + zero_point), as float (unpacked)."""
        low, high = self.code_range
        return (torch.round(latent.float() / self.scale) + self.zero_point.float()).clamp(low, high)

    def quantize(self, latent: torch.Tensor) -> torch.Tensor:
        """(…, width) float latent → (…, stored_width) codes: int8, or uint8 holding two 4-bit codes."""
        if self.onnx_ops:
            from torch.ao.quantization.fx import _decomposed  # noqa: F401  (registers quantized_decomposed)

            low, high = self.code_range
            codes = torch.ops.quantized_decomposed.quantize_per_channel(
                latent.float(), self.scale, self.zero_point.long(), latent.dim() - 1, low, high, self.code_dtype)
        else:
            codes = self.codes(latent).to(self.code_dtype)
        if self.bits == 8:
            return codes
        if self.width % 2:
            codes = nn.functional.pad(codes, (0, 1))
        # Two codes per byte, low nibble first. In float arithmetic (exact for 0…255) rather than bit shifts,
        # which ONNX defines for unsigned types only and the exporter casts through signed ones.
        pairs = codes.unflatten(-1, (-1, 2)).float()
        return (pairs[..., 0] + 16 * pairs[..., 1]).to(torch.uint8)

    def dequantize(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """DequantizeLinear: (codes - zero_point)·scale, in ``dtype``."""
        if self.bits == 4:
            byte = stored.float()
            high = torch.floor(byte / 16)
            stored = torch.stack([byte - 16 * high, high], dim=-1).flatten(-2)[..., : self.width].to(torch.uint8)
        if self.onnx_ops:
            from torch.ao.quantization.fx import _decomposed  # noqa: F401

            low, high = self.code_range
            return torch.ops.quantized_decomposed.dequantize_per_channel(
                stored, self.scale, self.zero_point.long(), stored.dim() - 1, low, high, self.code_dtype).to(dtype)
        return ((stored.float() - self.zero_point.float()) * self.scale).to(dtype)

    def fit(self, low: torch.Tensor, high: torch.Tensor, rows: torch.Tensor | None, granularity: str) -> None:
        """Set scale and zero point from the calibrated per-channel range ``[low, high]``.

        ``tensor``: one range for all channels. 4 bits: per channel (or for the whole tensor) the
        clipping ratio of :data:`CLIP_RATIOS` with the least squared error on ``rows``.
        """
        if granularity not in GRANULARITIES:
            raise InvalidInputError(f"Unknown KV quantization granularity {granularity!r}; choose one of {GRANULARITIES}")
        low, high = low.float().clamp(max=0.0), high.float().clamp(min=0.0)  # the range holds 0 exactly
        if granularity == "tensor":
            low, high = low.min().expand(self.width), high.max().expand(self.width)
        ratios = CLIP_RATIOS if (self.bits == 4 and rows is not None and rows.numel()) else (1.0,)
        best_error, best = None, None
        for ratio in ratios:
            scale, zero_point = self._range(low * ratio, high * ratio)
            if len(ratios) == 1:
                best = (scale, zero_point)
                break
            self.scale.copy_(scale), self.zero_point.copy_(zero_point)
            error = (self.dequantize(self.quantize(rows), torch.float32) - rows.float()).square().sum(0)
            if granularity == "tensor":
                error = error.sum().expand(self.width)
            if best is None:
                best_error, best = error, (scale.clone(), zero_point.clone())
                continue
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best = (torch.where(better, scale, best[0]), torch.where(better, zero_point, best[1]))
        self.scale.copy_(best[0]), self.zero_point.copy_(best[1])

    def _range(self, low: torch.Tensor, high: torch.Tensor):
        qmin, qmax = self.code_range
        scale = ((high - low) / (qmax - qmin)).clamp(min=1e-8)
        zero_point = (qmin - torch.round(low / scale)).clamp(qmin, qmax).to(self.code_dtype)
        return scale, zero_point

    def extra_repr(self) -> str:
        return f"width={self.width}, bits={self.bits}"


class LatentRange:
    """Per-channel min/max of one latent over the calibration calls, and a seeded sample of its rows."""

    def __init__(self, seed: int):
        self.low = self.high = None
        self.rows: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, module, inputs, output) -> None:
        flat = output.detach().reshape(-1, output.shape[-1]).float()
        low, high = flat.amin(0).cpu(), flat.amax(0).cpu()
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)
        pick = torch.randperm(flat.shape[0], generator=self.generator)[:SAMPLE_ROWS]
        self.rows.append(flat[pick.to(flat.device)].cpu())


def random_rotation(width: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal width×width matrix (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@torch.no_grad()
def rotate_latent(projection, generator: torch.Generator) -> None:
    """Turn each group's latent by an orthogonal R_g: down_g ← R_gᵀ·down_g, up_g ← up_g·R_g (same float output)."""
    start = 0
    weight = projection.down.weight
    for up, rank in zip(projection.ups, projection.ranks):
        rotation = random_rotation(rank, generator)
        rows = slice(start, start + rank)
        weight[rows] = (rotation.T @ weight[rows].double()).to(weight.dtype)
        up.weight.copy_((up.weight.double() @ rotation).to(up.weight.dtype))
        start += rank


def calibrate_latent_quantizers(attentions: Iterable[nn.Module], run: Callable[[], None], bits: int,
                                granularity: str = "channel", rotate: bool = False, seed: int = 0) -> None:
    """Give every ``LatentKVAttention`` in ``attentions`` static K/V latent quantizers.

    ``run()`` pushes the calibration data through them (a whole model, or one decoder block); the
    latents are observed in float (these layers unquantized), then the quantizers are installed.
    """
    check_bits(bits)
    if granularity not in GRANULARITIES:
        raise InvalidInputError(f"Unknown KV quantization granularity {granularity!r}; choose one of {GRANULARITIES}")
    attentions = list(attentions)
    generator = torch.Generator().manual_seed(seed)
    ranges, hooks = {}, []
    for index, attention in enumerate(attentions):
        attention.key_quantizer = attention.value_quantizer = None
        for role, projection in (("key", attention.k_proj), ("value", attention.v_proj)):
            if rotate:
                rotate_latent(projection, generator)
            observer = ranges[(index, role)] = LatentRange(seed + 2 * index + (role == "value"))
            hooks.append(projection.register_forward_hook(observer))
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    for index, attention in enumerate(attentions):
        for role, projection in (("key", attention.k_proj), ("value", attention.v_proj)):
            observed = ranges[(index, role)]
            if observed.low is None:
                raise InvalidInputError(f"{attention.layout.name}: the calibration run never reached this layer")
            quantizer = LatentQuantizer(projection.latent_width, bits, device=projection.down.weight.device)
            quantizer.fit(observed.low, observed.high, torch.cat(observed.rows), granularity)
            setattr(attention, f"{role}_quantizer", quantizer)


def install_empty_quantizers(attentions: Iterable[nn.Module], bits: int) -> None:
    """Quantizers of the right shapes whose scales and zero points a checkpoint then fills (loading)."""
    for attention in attentions:
        for role, projection in (("key", attention.k_proj), ("value", attention.v_proj)):
            setattr(attention, f"{role}_quantizer",
                    LatentQuantizer(projection.latent_width, bits, device=projection.down.weight.device))


def quantizer_shapes(name: str, key_width: int, value_width: int) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of one attention's quantizers."""
    return {f"{name}.{role}_quantizer.{buffer}": (width,)
            for role, width in (("key", key_width), ("value", value_width)) for buffer in ("scale", "zero_point")}


def latent_bytes(width: int, bits: int | None, dtype_bytes: int) -> int:
    """Bytes per token of one latent of ``width`` numbers."""
    return width * dtype_bytes if bits is None else (width if bits == 8 else math.ceil(width / 2))
