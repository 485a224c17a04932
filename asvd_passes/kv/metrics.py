"""Output-side metrics for K and V: which errors in a head's K or V the rest of the layer actually sees.

Whitening makes the SVD optimal for the projection's own output error ‖(W − W')X‖. But K is only
ever read through scores qᵀk and V through ``o_proj``, so an error δk costs E[(qᵀδk)²] =
δkᵀ·E[qqᵀ]·δk and an error δv costs ‖W_o,h·δv‖² summed over the query heads that read that KV
head. With M that metric, the SVD of M^½·W·S (then up = M^-½·U·√Σ) minimises the error the layer
sees. Both metrics come from weights and the input Gram already collected: E[qqᵀ] = W_q·G·W_qᵀ.

RoPE rotates q and k by position-dependent angles, so the key metric is averaged over rotations:
within each rotary pair the 2×2 block becomes isotropic and cross-pair terms vanish (a diagonal
metric); models without RoPE keep the full matrix. A norm on K (Qwen3's and Gemma 3's per head, OLMo 2's
over the projection) sits between the projection and the score, so those models keep the plain
whitened objective for K.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules import projection_weight
from .layout import AttentionLayout


def _query_weight(model: nn.Module, layout: AttentionLayout) -> torch.Tensor:
    if layout.fused:
        return projection_weight(model.get_submodule(f"{layout.name}.{layout.fused}"))[layout.rows("query")]
    return projection_weight(model.get_submodule(f"{layout.name}.q_proj"))


def _rotary_dims(model: nn.Module, layout: AttentionLayout) -> int:
    """How many leading dims of each head RoPE rotates (0 without RoPE)."""
    family = layout.family
    rotary = family.rotary_module(model)
    if rotary is None:
        return 0
    return 2 * family.inv_freq(rotary, family.layer_type(model.config, layout.layer_idx)).numel()


def head_metrics(model: nn.Module, layout: AttentionLayout, role: str, gram: torch.Tensor | None) -> list[torch.Tensor] | None:
    """One (head_dim × head_dim) metric per KV head for ``role``; ``None`` where none applies."""
    attention = model.get_submodule(layout.name)
    per_kv = layout.heads // layout.kv_heads
    hd = layout.head_dim
    metrics = []
    if role == "key":
        if gram is None or layout.family.qk_norm is not None:
            return None
        weight = _query_weight(model, layout).double()
        rotary = _rotary_dims(model, layout)
        for j in range(layout.kv_heads):
            rows = weight[j * per_kv * hd : (j + 1) * per_kv * hd].view(per_kv, hd, -1)
            metric = sum(w @ gram @ w.T for w in rows)
            if rotary:
                diagonal = metric.diagonal().clone()
                half = rotary // 2  # rotate_half pairs dim c with dim c + half
                paired = (diagonal[:half] + diagonal[half:rotary]) / 2
                diagonal[:half], diagonal[half:rotary] = paired, paired
                metric = torch.diag(diagonal)
            metrics.append(metric)
    else:
        out = projection_weight(getattr(attention, layout.output)).double()  # (hidden, heads·hd)
        for j in range(layout.kv_heads):
            metric = sum(
                out[:, h * hd : (h + 1) * hd].T @ out[:, h * hd : (h + 1) * hd] for h in range(j * per_kv, (j + 1) * per_kv)
            )
            metrics.append(metric)
    return metrics


def root_and_inverse(metric: torch.Tensor, damping: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric M^½ and M^-½ (eigenvalues floored at ``damping``·mean eigenvalue)."""
    values, vectors = torch.linalg.eigh(metric)
    values = values.clamp_min(damping * values.mean().clamp_min(1e-30))
    root = (vectors * values.sqrt()) @ vectors.T
    inverse = (vectors * values.rsqrt()) @ vectors.T
    return root, inverse
