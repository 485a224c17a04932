"""Observer modules: inserted into the traced graph, they accumulate statistics of one input tensor."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidInputError

STATISTICS = ("abs_mean", "abs_max", "gram")


class NonFiniteActivationError(InvalidInputError):
    """Calibration produced NaN or Inf in a projection input."""


class InputStatistics(nn.Module):
    """Per-channel statistics of the tensor feeding one group of projections.

    * ``abs_sum`` / ``count``: mean |x| per channel (ASVD's scale),
    * ``abs_max``: max |x| per channel,
    * ``gram``: XᵀX over all tokens (SVD-LLM's whitening), accumulated in float64 (on the CPU from
      float32 products over chunks of tokens when X is single precision or less).

    The forward pass returns nothing: the node it is called from has no users, so the observed
    graph computes exactly what the original graph did.
    """

    def __init__(self, features: int, statistics: tuple[str, ...], consumers: tuple[str, ...]):
        super().__init__()
        unknown = set(statistics) - set(STATISTICS)
        if unknown:
            raise ValueError(f"Unknown statistics {sorted(unknown)}")
        self.features = features
        self.statistics = tuple(statistics)
        self.consumers = tuple(consumers)
        self.count = 0
        self.abs_sum = torch.zeros(features, dtype=torch.float64)
        self.abs_max = torch.zeros(features, dtype=torch.float32)
        self.gram = torch.zeros(features, features, dtype=torch.float64) if "gram" in statistics else None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        self._follow(flat.device)
        self.count += flat.shape[0]
        magnitudes = "abs_mean" in self.statistics or "abs_max" in self.statistics
        if magnitudes:
            magnitude = flat.abs()
            self.abs_sum += magnitude.sum(0, dtype=torch.float64)
            self.abs_max = torch.maximum(self.abs_max, magnitude.amax(0).float())
        if self.gram is not None:
            self._add_gram(flat)
        # A NaN or Inf anywhere in x reaches Σ|x| and the diagonal of Σxxᵀ: checking those costs one
        # pass over the features instead of one over every activation.
        sums = self.gram.diagonal() if self.gram is not None else self.abs_sum if magnitudes else flat
        if not torch.isfinite(sums).all():
            raise NonFiniteActivationError(
                f"NaN or Inf activations reach {', '.join(self.consumers)}; "
                "check the model weights, dtype (fp16 overflow?) and calibration text"
            )

    # Tokens per single-precision product on the CPU: each XᵀX entry then sums at most this many
    # float32 terms (relative error ~√512·2⁻²⁴ ≈ 1e-6, far below the calibration sample's own noise)
    # before the float64 accumulation; a float64 product costs 1.6x as much there, widened copy of X
    # included. GPUs keep float64 products (a float32 matmul may run in TF32 there).
    gram_chunk_tokens = 512

    def _add_gram(self, flat: torch.Tensor) -> None:
        if flat.dtype == torch.float64 or flat.device.type != "cpu":
            wide = flat.double()
            self.gram.addmm_(wide.T, wide)
            return
        flat = flat.float()
        for start in range(0, flat.shape[0], self.gram_chunk_tokens):
            part = flat[start : start + self.gram_chunk_tokens]
            self.gram += part.T @ part

    def _follow(self, device: torch.device) -> None:
        """Accumulate where the activations are (a GPU run keeps its statistics on the GPU)."""
        if self.abs_sum.device != device:
            for name in ("abs_sum", "abs_max", "gram", "cross"):
                value = getattr(self, name, None)
                if value is not None:
                    setattr(self, name, value.to(device))

    def abs_mean(self) -> torch.Tensor:
        if self.count == 0:
            raise InvalidInputError(f"No calibration data reached {', '.join(self.consumers)}")
        return self.abs_sum / self.count
