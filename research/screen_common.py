"""What the whole-path quality screens share: the model, calibration and held-out validation windows,
validation perplexity, and one Fisher pass reused by every variant of a run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's asvd_passes, whatever is installed
DATA = str(ROOT.parent / "shared" / "data" / "wikitext-2") + "/"
SEQLEN, CALIBRATION_WINDOWS, HELD_OUT_WINDOWS = 512, 16, 30


def load():
    """(compressor, model, tokenizer, calibration windows, held-out validation windows).

    Calibration: the benchmark's 16×512 validation windows, seed 0. Held out: the last 30 aligned
    512-token windows of the validation split that overlap no calibration window.
    """
    from asvd_passes import ASVDCompressor
    from asvd_passes.data import random_windows, read_text, tokenize

    compressor = ASVDCompressor.from_pretrained(None)
    valid = tokenize(compressor.tokenizer, read_text(DATA + "wiki.valid.tokens"))
    calibration = random_windows(valid, CALIBRATION_WINDOWS, SEQLEN, 0, "calibration")
    # The same draw as data.random_windows, for the starts it does not return.
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, valid.numel() - SEQLEN, (CALIBRATION_WINDOWS,), generator=generator).tolist()
    held = [valid[i * SEQLEN:(i + 1) * SEQLEN] for i in range(valid.numel() // SEQLEN)
            if all((i + 1) * SEQLEN <= s or i * SEQLEN >= s + SEQLEN for s in starts)]
    return compressor, compressor.model, compressor.tokenizer, calibration, torch.stack(held[-HELD_OUT_WINDOWS:])


@torch.no_grad()
def validation_perplexity(model, held: torch.Tensor) -> float:
    nll, tokens = 0.0, 0
    for window in held:
        logits = model(input_ids=window[None], use_cache=False).logits.float()
        nll += F.cross_entropy(logits[0, :-1], window[1:], reduction="sum").item()
        tokens += window.numel() - 1
    return math.exp(nll / tokens)


def reuse_output_fisher(compute=None, log=None) -> None:
    """Make the whole pipeline's ``output_fisher`` run once per (names, covariance) in this process.

    ``compute`` replaces it for the covariance (output-whitening) passes; copies are handed out
    because the pipeline may consume what it gets.
    """
    import time

    from asvd_passes.pipelines import whole

    original, cache = whole.output_fisher, {}

    def cached(model, names, windows, progress=True, covariance=False):
        key = (tuple(names), covariance)
        if key not in cache:
            tick = time.time()
            function = compute if compute is not None and covariance else original
            cache[key] = function(model, names, windows, progress=False, covariance=covariance)
            if log is not None:
                log(f"# fisher covariance={covariance} {time.time() - tick:.0f}s")
        return {name: value.clone() for name, value in cache[key].items()}

    whole.output_fisher = cached


def restore_dense(model, dense_modules: dict) -> None:
    """Put the dense projections back after a variant was applied (and forget its quantization config)."""
    from asvd_passes.modules import replace_module

    for name, module in dense_modules.items():
        replace_module(model, name, module)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
