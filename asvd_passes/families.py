"""One adapter table: everything the passes need to know about a model family, and nothing outside it.

Each :class:`Family` entry says, for one attention class (and the models that use it):

- where the decoder blocks are (``blocks``: the ``nn.ModuleList``'s path) and the attention inside a
  block (``attention``);
- where Q, K and V come from: own ``q_proj``/``k_proj``/``v_proj``, or the rows of one fused
  projection, either stacked ``[Q | K | V]`` (Phi-3's ``qkv_proj``, GPT-2's ``c_attn``) or interleaved
  per head ``[q_h | k_h | v_h]`` (GPT-NeoX's ``query_key_value``); and the output projection;
- head geometry (heads, KV heads, ``head_dim``, which may differ from hidden / heads);
- the position scheme: ``rope`` (the model's own rotary module and ``apply_rotary_pos_emb``, partial
  rotary and static scalings included; per layer type for Gemma 3), ``learned`` absolute positions
  (added to the embeddings, nothing to do in attention), or ``none``;
- q/k norms: per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2: a latent K is rebuilt
  to its full width before the norm);
- attention logit softcapping (Gemma 2), sliding windows (read from the config for every layer, or
  per layer from the module), attention scaling (``query_pre_attn_scalar`` for Gemma: the dense
  module's own ``scaling``), and the keyword the decoder layer passes the cache under.

:func:`check_latent_support` rejects, before any work, an attention class the table does not list
and a config feature its adapter does not implement (softcapping where the family does not apply
it, a RoPE type whose frequencies change with the sequence length, bidirectional attention, …).
That check guards the KV pass, loading a latent model and the ONNX export; weight-only compression
of the Linear projections needs no attention knowledge and runs on any model.

:func:`decoder_blocks` is the one way to find the decoder blocks (the sequential pipeline and the
block replay use it): the table's path for a known family, else the ``nn.ModuleList`` with
``config.num_hidden_layers`` entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import InvalidInputError

# RoPE types whose frequencies are fixed: keys rebuilt later can be rotated again with the same table.
# "dynamic" and "longrope" change the frequencies with the sequence length, so a key the dense model
# rotated (and cached) early would differ from the same key rotated again later.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(InvalidInputError):
    """The model's attention (class or a config feature) is not covered by the adapter table."""


@dataclass(frozen=True)
class Family:
    name: str
    attention_classes: tuple[str, ...]
    blocks: str  # path of the decoder ModuleList inside the CausalLM
    attention: str  # attribute of a decoder block holding its self-attention
    output: str  # attribute of the attention holding its output projection
    fused: str | None = None  # attribute of one projection giving Q, K and V; None: q_proj/k_proj/v_proj
    interleaved: bool = False  # fused rows per head [q_h | k_h | v_h] (GPT-NeoX) instead of [Q | K | V]
    positions: str = "rope"  # "rope" | "learned" | "none"
    rotary: str | None = "model.rotary_emb"  # path of the shared rotary module (positions == "rope")
    rope_per_layer_type: bool = False  # the rotary module takes the layer type (Gemma 3)
    qk_norm: str | None = None  # None | "head" (per head, after the view) | "projection" (whole width, before)
    softcap: bool = False  # passes config.attn_logit_softcapping to the attention function
    sliding: str = "none"  # "none" | "config" (config.sliding_window, every layer) | "layer" (module.sliding_window)
    cache_kwarg: str = "past_key_values"  # how the decoder layer hands the cache to the attention

    # -- per module ----------------------------------------------------------------------------
    def head_geometry(self, module: nn.Module, config) -> tuple[int, int, int]:
        """(heads, kv_heads, head_dim) of one attention module."""
        heads = int(getattr(config, "num_attention_heads", None) or module.num_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = getattr(module, "head_dim", None) or getattr(module, "head_size", None)
        return heads, kv_heads, int(head_dim)

    def sliding_window(self, module: nn.Module, config) -> int | None:
        if self.sliding == "config":
            return getattr(config, "sliding_window", None)
        if self.sliding == "layer":
            return getattr(module, "sliding_window", None)
        return None

    def softcap_of(self, config) -> float | None:
        return getattr(config, "attn_logit_softcapping", None) if self.softcap else None

    def scaling(self, module: nn.Module, head_dim: int) -> float:
        """The dense module's own score scale (Gemma: query_pre_attn_scalar^-½, GPT-2: by layer index…)."""
        return float(getattr(module, "scaling", head_dim**-0.5))

    def layer_type(self, config, layer_idx: int) -> str | None:
        types = getattr(config, "layer_types", None)
        return types[layer_idx] if types else None

    def rotary_module(self, model: nn.Module) -> nn.Module | None:
        if self.positions != "rope":
            return None
        return model.get_submodule(self.rotary)

    def rope(self, rotary: nn.Module, like: torch.Tensor, positions: torch.Tensor, layer_type: str | None):
        """cos/sin of ``positions`` from the model's rotary module."""
        if self.rope_per_layer_type:
            return rotary(like, positions, layer_type)
        return rotary(like, positions)

    def inv_freq(self, rotary: nn.Module, layer_type: str | None) -> torch.Tensor:
        if self.rope_per_layer_type:
            return getattr(rotary, f"{layer_type}_inv_freq")
        return rotary.inv_freq


_LLAMA_LIKE = dict(blocks="model.layers", attention="self_attn", output="o_proj")

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaAttention",), **_LLAMA_LIKE),
    Family("mistral", ("MistralAttention",), sliding="config", **_LLAMA_LIKE),
    Family("qwen2", ("Qwen2Attention",), sliding="layer", **_LLAMA_LIKE),
    Family("qwen3", ("Qwen3Attention",), sliding="layer", qk_norm="head", **_LLAMA_LIKE),
    Family("phi3", ("Phi3Attention",), fused="qkv_proj", sliding="config", **_LLAMA_LIKE),
    Family("olmo2", ("Olmo2Attention",), qk_norm="projection", **_LLAMA_LIKE),
    Family("gemma2", ("Gemma2Attention",), softcap=True, sliding="layer", **_LLAMA_LIKE),
    Family("gemma3", ("Gemma3Attention",), qk_norm="head", sliding="layer", rope_per_layer_type=True, **_LLAMA_LIKE),
    Family("opt", ("OPTAttention",), blocks="model.decoder.layers", attention="self_attn", output="out_proj",
           positions="learned", rotary=None),
    Family("gpt2", ("GPT2Attention",), blocks="transformer.h", attention="attn", output="c_proj", fused="c_attn",
           positions="learned", rotary=None),
    Family("gpt_neox", ("GPTNeoXAttention",), blocks="gpt_neox.layers", attention="attention", output="dense",
           fused="query_key_value", interleaved=True, rotary="gpt_neox.rotary_emb", cache_kwarg="layer_past"),
)
_BY_CLASS = {cls: family for family in FAMILIES for cls in family.attention_classes}


# -- decoder blocks ------------------------------------------------------------------------------
def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, blocks)``: the qualified name and the ``nn.ModuleList`` of the model's decoder blocks.

    A family in the table gives its path (``model.layers``, ``transformer.h``, ``gpt_neox.layers``,
    ``model.decoder.layers``); any other model falls back to the longest ``nn.ModuleList`` with
    ``config.num_hidden_layers`` entries. Block i runs before block i + 1.
    """
    for family in FAMILIES:
        try:
            blocks = model.get_submodule(family.blocks)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks) and _attention_class(blocks[0], family):
            return family.blocks, blocks
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    matching = [(n, m) for n, m in lists if count is None or len(m) == count]
    if not matching:
        raise InvalidInputError(f"Cannot find the decoder blocks of {type(model).__name__}")
    return max(matching, key=lambda item: len(item[1]))


def _attention_class(block: nn.Module, family: Family) -> bool:
    attention = getattr(block, family.attention, None)
    if getattr(attention, "family", None) is family:  # already a LatentKVAttention built from this family
        return True
    return type(attention).__name__ in family.attention_classes


# -- attention modules ---------------------------------------------------------------------------
def family_of(model: nn.Module, purpose: str = "a latent KV cache") -> Family:
    """The table entry of ``model``'s attention; :class:`UnsupportedModelError` if it has none."""
    try:
        _, blocks = decoder_blocks(model)
    except ValueError as err:
        raise UnsupportedModelError(f"{type(model).__name__}: {err}; {_purpose_note(purpose)}") from err
    found = set()
    for block in blocks:
        for family in FAMILIES:
            attention = getattr(block, family.attention, None)
            if isinstance(getattr(attention, "family", None), Family):  # a LatentKVAttention built from the table
                return attention.family
            if attention is not None and _attention_class(block, family):
                return family
        found |= {type(m).__name__ for m in block.modules() if type(m).__name__.endswith("Attention")}
    names = ", ".join(sorted(found)) or f"no attention module in the blocks of {type(model).__name__}"
    raise UnsupportedModelError(
        f"Attention class {names} (model type {getattr(model.config, 'model_type', '?')!r}) is not in the "
        f"family table (asvd_passes/families.py: {', '.join(f.name for f in FAMILIES)}); {_purpose_note(purpose)}"
    )


def attention_modules(model: nn.Module, family: Family | None = None) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every decoder block's self-attention, in block order."""
    family = family or family_of(model)
    path, blocks = decoder_blocks(model)
    return [(f"{path}.{i}.{family.attention}", getattr(block, family.attention)) for i, block in enumerate(blocks)]


def _purpose_note(purpose: str) -> str:
    return (f"{purpose} needs the attention to be known exactly. Weight-only compression of the Linear "
            "projections (--param-ratio without --kv-ratio) needs no attention knowledge and still works.")


def _rope_type(parameters) -> str | None:
    if not isinstance(parameters, dict):
        return None
    if "rope_type" in parameters or "type" in parameters:
        return parameters.get("rope_type", parameters.get("type"))
    return None


def rope_types(config) -> list[str]:
    """Every RoPE type the config declares (per layer type where the model keeps one per type)."""
    found = []
    for attribute in ("rope_parameters", "rope_scaling"):
        parameters = getattr(config, attribute, None)
        if not isinstance(parameters, dict):
            continue
        own = _rope_type(parameters)
        if own is not None:
            found.append(own)
        else:  # {layer_type: {...}}
            found += [t for t in (_rope_type(p) for p in parameters.values()) if t is not None]
    return found or ["default"]


def check_latent_support(model: nn.Module, purpose: str = "A latent KV cache") -> Family:
    """The model's family, after checking that its adapter implements every attention feature the config asks for.

    Raises :class:`UnsupportedModelError` naming the attention class and the feature otherwise.
    """
    family = family_of(model, purpose)
    config = model.config
    attention_class = family.attention_classes[0]

    def refuse(feature: str):
        raise UnsupportedModelError(
            f"{attention_class} (family {family.name!r}): {feature} is not implemented by its adapter in "
            f"asvd_passes/families.py; {_purpose_note(purpose)}"
        )

    if getattr(config, "attn_logit_softcapping", None) is not None and not family.softcap:
        refuse(f"attention logit softcapping (config.attn_logit_softcapping={config.attn_logit_softcapping})")
    if getattr(config, "use_bidirectional_attention", False):
        refuse("bidirectional attention (config.use_bidirectional_attention=True)")
    if getattr(config, "reorder_and_upcast_attn", False):
        refuse("reordered, upcast attention (config.reorder_and_upcast_attn=True)")
    if getattr(config, "sliding_window", None) is not None and family.sliding == "none":
        refuse(f"a sliding window (config.sliding_window={config.sliding_window})")
    if family.positions == "rope":
        for rope_type in rope_types(config):
            if rope_type not in STATIC_ROPE_TYPES:
                refuse(f"RoPE type {rope_type!r} (supported: {', '.join(STATIC_ROPE_TYPES)}; its frequencies "
                       "depend on the sequence length, so re-rotating rebuilt keys would not match the dense cache)")
    for _, module in attention_modules(model, family):
        if getattr(module, "is_cross_attention", False):
            refuse("cross-attention")
    return family


def rope_settings(model: nn.Module) -> dict | None:
    """What the ONNX metadata records of the position scheme (``None`` without RoPE)."""
    family = family_of(model)
    rotary = family.rotary_module(model)
    if rotary is None:
        return None
    config = model.config
    types = sorted(set(getattr(config, "layer_types", None) or [None])) if family.rope_per_layer_type else [None]
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return {
        "rotary_dim": {str(t): int(2 * family.inv_freq(rotary, t).numel()) for t in types} if family.rope_per_layer_type
        else int(2 * family.inv_freq(rotary, None).numel()),
        "theta": getattr(config, "rope_theta", None) or (parameters or {}).get("rope_theta"),
        "parameters": parameters,
        "applied": "after rebuilding K from the latent",
    }
