"""Where each attention layer's K and V come from: projection, row slices, head geometry.

Attention modules are recognised by structure, not by family name: a module with ``k_proj`` and
``v_proj`` (Llama, Mistral, Qwen2/3, OPT), a fused ``qkv_proj`` (Phi-3) or GPT-2's fused ``c_attn``
``Conv1D``, plus a ``head_dim`` and a ``layer_idx``. The fused ones are split by the query / key /
value widths the module itself declares.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import InvalidInputError
from ..modules import projection_shape

OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "dense")


@dataclass(frozen=True)
class AttentionLayout:
    name: str  # qualified name of the attention module
    layer_idx: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int  # input width of the projections
    fused: str | None  # "qkv_proj" / "c_attn" when Q, K and V come from one projection, else None
    output: str  # attribute name of the output projection

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

    def rows(self, role: str) -> slice:
        """Output rows of :meth:`source` that are K (or V)."""
        if not self.fused:
            return slice(0, self.kv_width)
        start = self.q_width + (0 if role == "key" else self.kv_width)
        return slice(start, start + self.kv_width)

    def groups(self, group_size: int) -> int:
        if group_size < 1 or self.kv_heads % group_size:
            raise InvalidInputError(
                f"kv group size {group_size} must divide the {self.kv_heads} KV heads of {self.name}"
            )
        return self.kv_heads // group_size


def _head_counts(module: nn.Module, config) -> tuple[int, int]:
    heads = getattr(config, "num_attention_heads", None) or getattr(module, "num_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return int(heads), int(kv_heads)


def find_attention_layers(model: nn.Module) -> list[AttentionLayout]:
    """Every self-attention module whose K and V projections can be given a latent cache."""
    from .modules import LatentKVAttention

    config = model.config
    layouts = []
    for name, module in model.named_modules():
        if isinstance(module, LatentKVAttention):
            raise InvalidInputError("This model already has a latent KV cache; compress the original model instead")
        if getattr(module, "is_cross_attention", False):
            continue
        head_dim = getattr(module, "head_dim", None)
        layer_idx = getattr(module, "layer_idx", None)
        if head_dim is None or layer_idx is None:
            continue
        output = next((o for o in OUTPUT_PROJECTIONS if isinstance(getattr(module, o, None), nn.Module)), None)
        if output is None:
            continue
        heads, kv_heads = _head_counts(module, config)
        if isinstance(getattr(module, "k_proj", None), nn.Module) and isinstance(getattr(module, "v_proj", None), nn.Module):
            fused = None
            hidden = projection_shape(module.k_proj)[1]  # a weight-compressed k_proj is a LowRankLinear
        elif isinstance(getattr(module, "qkv_proj", None), nn.Module):
            fused = "qkv_proj"
        elif isinstance(getattr(module, "c_attn", None), nn.Module):
            fused = "c_attn"
        else:
            continue
        if fused:
            outputs, hidden = projection_shape(getattr(module, fused))
            if outputs != (heads + 2 * kv_heads) * head_dim:
                raise InvalidInputError(f"{name}.{fused} has {outputs} outputs, not Q+K+V of the declared heads")
        layouts.append(AttentionLayout(name, int(layer_idx), heads, kv_heads, int(head_dim), int(hidden), fused, output))
    if not layouts:
        raise InvalidInputError(f"{type(model).__name__}: no self-attention module with K/V projections was found")
    return layouts
