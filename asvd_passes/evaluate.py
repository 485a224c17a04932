"""Perplexity with the protocol of ``shared/data/README.md``: non-overlapping windows, mean token NLL."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import read_text, tokenize
from .errors import InvalidInputError


@torch.no_grad()
def perplexity(model, tokenizer, source: str, seqlen: int = 512, windows: int | None = None, progress=True) -> dict:
    """``{"ppl", "seqlen", "windows", "tokens"}`` over the first ``windows`` windows of ``source``."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise InvalidInputError(f"seqlen {seqlen} is longer than the model's {limit} positions")
    model.eval()
    device = next(model.parameters()).device

    def logits_of(window: torch.Tensor) -> torch.Tensor:
        return model(input_ids=window.to(device), use_cache=False).logits.float().cpu()

    return window_perplexity(logits_of, tokenizer, source, seqlen, windows, progress)


@torch.no_grad()
def window_perplexity(logits_of: Callable[[torch.Tensor], torch.Tensor], tokenizer, source: str, seqlen: int = 512,
                      windows: int | None = None, progress=True) -> dict:
    """The protocol over any ``(1, seqlen) ids → (1, seqlen, vocab) logits`` function (PyTorch or ONNX Runtime)."""
    tokens = tokenize(tokenizer, read_text(source))
    available = tokens.numel() // seqlen
    if available < 1:
        raise InvalidInputError(f"{source} has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    count = available if windows is None else min(windows, available)
    total_nll, total_tokens = 0.0, 0
    for i in tqdm(range(count), desc="evaluate", disable=not progress):
        window = tokens[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
        logits = logits_of(window).float()
        nll = F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        total_nll += nll.item()
        total_tokens += seqlen - 1
    if not math.isfinite(total_nll):
        raise InvalidInputError("perplexity is not finite: the model produced NaN/Inf logits")
    return {"ppl": math.exp(total_nll / total_tokens), "seqlen": seqlen, "windows": count, "tokens": total_tokens}
