"""Memory estimates, the device, and which pipeline ``auto`` picks.

The whole-model path keeps, besides the weights, every projection's float64 Gram matrix, scaled
copy and full SVD: about 30 bytes per parameter. The sequential path holds one decoder block (in
the compute dtype), that block's float64 statistics and its largest SVD, the calibration hidden
states and the parts outside the blocks (embeddings, final norm, LM head).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidInputError

GIB = 1024**3
WHOLE_PATH_BYTES_PER_PARAM = 30  # float64 Gram + scaled copy + U, Σ, Vᵀ per projection
RUNTIME_OVERHEAD = 0.6 * GIB  # Python, torch, transformers, tokenizer


class MemoryBudgetError(InvalidInputError):
    """The memory budget cannot hold what one step of the compression needs."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or the OS's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf"):  # macOS: physical memory (no MemAvailable)
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    import psutil  # Windows

    return int(psutil.virtual_memory().available)


@dataclass
class MemoryEstimate:
    params: int
    whole_path: int  # bytes the whole-model path needs
    one_block: int  # bytes the sequential path needs (one block + what stays resident)

    def describe(self) -> str:
        return f"whole-model path ≈ {self.whole_path / GIB:.2f} GiB, sequential ≈ {self.one_block / GIB:.2f} GiB"


def estimate(model: nn.Module, blocks: nn.ModuleList, windows: int, seqlen: int) -> MemoryEstimate:
    """Estimate from shapes only (works on a meta-device model)."""
    params = sum(p.numel() for p in model.parameters())
    block = max(blocks, key=lambda b: sum(p.numel() for p in b.parameters()))
    block_params = sum(p.numel() for p in block.parameters())
    linears = [m.weight for m in block.modules() if hasattr(m, "weight") and isinstance(m.weight, torch.Tensor) and m.weight.dim() == 2]
    largest = max((w.numel() for w in linears), default=0)
    grams = sum(max(w.shape) ** 2 for w in linears) * 8 // 2  # at most one Gram per distinct input; ~half the projections
    hidden = getattr(model.config, "hidden_size", None) or max((w.shape[1] for w in linears), default=0)
    activations = 4 * windows * seqlen * hidden * 4  # current/next, and the dense reference path
    rest = (params - sum(sum(p.numel() for p in b.parameters()) for b in blocks)) * 4
    one_block = RUNTIME_OVERHEAD + block_params * 4 + 4 * largest * 8 + grams + activations + rest
    whole = RUNTIME_OVERHEAD + params * (4 + WHOLE_PATH_BYTES_PER_PARAM) + activations
    return MemoryEstimate(params, int(whole), int(one_block))


def check_budget(estimated: MemoryEstimate, max_memory_gib: float | None) -> None:
    """Refuse, before any work, a ``max_memory`` below what one block needs."""
    if max_memory_gib is None:
        return
    budget = float(max_memory_gib) * GIB
    if budget < estimated.one_block:
        raise MemoryBudgetError(
            f"--max-memory {max_memory_gib} GiB is less than one decoder block needs "
            f"(≈ {estimated.one_block / GIB:.2f} GiB: the block in float32, its float64 statistics and SVD, "
            f"the calibration hidden states and the embeddings/LM head); raise it or use fewer calibration windows"
        )


def choose_pipeline(compressor, config) -> tuple[str, str]:
    """``(pipeline, reason)`` for ``config.pipeline``; ``auto`` follows the rule in docs/ARCHITECTURE.md."""
    if config.pipeline != "auto":
        return config.pipeline, "asked for"
    if config.compresses_weights and config.allocation == "strs":
        return "whole", "strs probes the whole model"
    if config.compresses_weights and config.include_lm_head:
        return "whole", "the LM head lies outside the decoder blocks"
    model = compressor.model if compressor.source is None or compressor._model is not None else empty_model(compressor.source)
    try:
        blocks = _blocks(model)
    except (AttributeError, ValueError):
        return "whole", "no decoder blocks were found to go through one at a time"
    estimated = estimate(model, blocks, config.calib_samples, config.seqlen)
    device = resolve_device(config.device)
    budget = float(config.max_memory) * GIB if config.max_memory is not None else available_bytes(device)
    if estimated.whole_path > budget:
        return "sequential", f"{estimated.describe()}; {budget / GIB:.1f} GiB available"
    # Where both fit, the sequential path still wins: lower perplexity at every ratio of the quality
    # protocol (sequential calibration) and a fraction of the memory (docs/ARCHITECTURE.md, measured).
    return "sequential", f"it measures better where both fit ({estimated.describe()}; {budget / GIB:.1f} GiB available)"


def _blocks(model):
    from ..allocation.block_cache import decoder_layers

    return decoder_layers(model)


def empty_model(folder) -> nn.Module:
    """The model's structure with weights on the meta device (no memory), buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    import asvd_passes.hf_quantizer  # noqa: F401  (a compressed folder's config needs the quant method)

    config = AutoConfig.from_pretrained(str(folder))
    if getattr(config, "quantization_config", None) is not None:
        raise InvalidInputError(f"{folder} is already compressed (quantization_config in config.json); compress the original model")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    return model.eval()
