"""Where each attention layer's K and V come from: projection, rows, head geometry.

The knowledge of each family (attribute names, fused layouts, head geometry) lives in
:mod:`asvd_passes.families`; this module turns it into one :class:`AttentionLayout` per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidInputError
from ..families import Family


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
