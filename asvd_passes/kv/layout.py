"""Where each attention layer's K and V come from: projection, rows, head geometry.

The knowledge of each family (attribute names, fused layouts, head geometry) lives in
:mod:`asvd_passes.families`; this module turns it into one :class:`AttentionLayout` per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidInputError
from ..families import Family, check_latent_support, attention_modules
from ..modules import projection_shape


@dataclass(frozen=True)
class AttentionLayout:
    name: str  # qualified name of the attention module
    layer_idx: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int  # input width of the projections
    fused: str | None  # "qkv_proj" / "c_attn" / "query_key_value" when Q, K and V come from one projection
    output: str  # attribute name of the output projection
    interleaved: bool = False  # fused rows per head [q_h | k_h | v_h] (GPT-NeoX) instead of [Q | K | V]
    family: Family | None = None

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    def source(self, role: str) -> str:
        """Qualified name of the projection that produces ``role`` ("key" / "value") in the dense model."""
        if self.fused:
            return f"{self.name}.{self.fused}"
        return f"{self.name}.{'k_proj' if role == 'key' else 'v_proj'}"

    def rows(self, role: str) -> slice | torch.Tensor:
        """Output rows of :meth:`source` that are K (or V) ("query" too for a fused projection), in head order."""
        if not self.fused:
            return slice(0, self.kv_width)
        offset = {"query": 0, "key": 1, "value": 2}[role]
        if self.interleaved:  # per head h: rows [3h·d, 3h·d + d) are q_h, then k_h, then v_h
            d = self.head_dim
            heads = torch.arange(self.heads)[:, None] * 3 * d + offset * d
            return (heads + torch.arange(d)).reshape(-1)
        start = (0, self.q_width, self.q_width + self.kv_width)[offset]
        return slice(start, start + (self.q_width if role == "query" else self.kv_width))

    def groups(self, group_size: int) -> int:
        if group_size < 1 or self.kv_heads % group_size:
            raise InvalidInputError(
                f"kv group size {group_size} must divide the {self.kv_heads} KV heads of {self.name}"
            )
        return self.kv_heads // group_size


def find_attention_layers(model: nn.Module, purpose: str = "A latent KV cache") -> list[AttentionLayout]:
    """Every self-attention module whose K and V projections can be given a latent cache.

    Raises :class:`asvd_passes.families.UnsupportedModelError` for attention the family table does not cover.
    """
    from .modules import LatentKVAttention

    family = check_latent_support(model, purpose)
    config = model.config
    layouts = []
    for layer_idx, (name, module) in enumerate(attention_modules(model, family)):
        if isinstance(module, LatentKVAttention):
            raise InvalidInputError("This model already has a latent KV cache; compress the original model instead")
        heads, kv_heads, head_dim = family.head_geometry(module, config)
        if family.fused:
            outputs, hidden = projection_shape(getattr(module, family.fused))
            if outputs != (heads + 2 * kv_heads) * head_dim:
                raise InvalidInputError(f"{name}.{family.fused} has {outputs} outputs, not Q+K+V of the declared heads")
        else:
            hidden = projection_shape(module.k_proj)[1]  # a weight-compressed k_proj is a LowRankLinear
        layouts.append(AttentionLayout(name, int(getattr(module, "layer_idx", None) or layer_idx), heads, kv_heads,
                                       head_dim, int(hidden), family.fused, family.output, family.interleaved, family))
    return layouts
