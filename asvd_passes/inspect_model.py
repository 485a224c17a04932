"""What a saved (or in-memory) model's compression amounts to, with the KV cache size measured.

``kv_bytes_per_token`` is read off a real cache object after a forward of a few tokens, so it
counts whatever the attention actually stores; ``dense_kv_bytes_per_token`` is what the dense
model would store (K and V of every layer at full width, from the attention geometry).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .families import UnsupportedModelError
from .kv import LatentKVAttention, cache_nbytes, find_attention_layers
from .modules import LowRankLinear

PROBE_TOKENS = 16


def measure_kv_bytes_per_token(model: nn.Module, tokens: int = PROBE_TOKENS) -> int:
    """Cache bytes per token (batch 1) after one real forward of ``tokens`` tokens."""
    device = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    total = cache_nbytes(cache)
    if total % tokens:
        raise RuntimeError(f"cache holds {total} bytes after {tokens} tokens: not a whole number per token")
    return total // tokens


def inspect_model(model: nn.Module, folder: str | Path | None = None) -> dict:
    model = model.eval()
    dtype_size = next(model.parameters()).element_size()
    latent = {m.layout.name: m for m in model.modules() if isinstance(m, LatentKVAttention)}
    if latent:
        dense_width = sum(2 * m.layout.kv_width for m in latent.values())
    else:
        try:
            dense_width = sum(2 * l.kv_width for l in find_attention_layers(model))
        except UnsupportedModelError:  # a family outside the table: weight ranks still reported, no KV ratio
            dense_width = None
    quant = getattr(model.config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else (quant or {})
    report = {}
    if folder is not None and (Path(folder) / "asvd_report.json").is_file():
        report = json.loads((Path(folder) / "asvd_report.json").read_text())
    kv_bytes = measure_kv_bytes_per_token(model)
    dense_bytes = dense_width * dtype_size if dense_width is not None else None
    lowrank = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    return {
        "param_ratio": report.get("selected_ratio", 1.0 if not lowrank else None),
        "model_ratio": report.get("model_ratio"),
        "kv_ratio": kv_bytes / dense_bytes if dense_bytes else None,
        "kv_bytes_per_token": kv_bytes,
        "dense_kv_bytes_per_token": dense_bytes,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "method": quant.get("method"),
        "allocation": quant.get("allocation"),
        "lowrank_form": quant.get("lowrank_form", "pair") if lowrank else None,
        "kv_group_size": (quant.get("kv") or {}).get("group_size"),
        "kv_bits": next((m.key_quantizer.bits for m in latent.values() if m.key_quantizer is not None), None),
        "ranks": lowrank,
        "kv_ranks": {name: {"key": m.k_proj.ranks, "value": m.v_proj.ranks} for name, m in latent.items()},
    }
