"""The KV pass: scaled SVD of each head group's K/V rows, then swap in ``LatentKVAttention``.

Each group's rows of the K (or V) projection share the projection's input statistics, so the
same scaling S (identity, ASVD diagonal, or whitening) serves every group; the SVD of W_g·S gives
``down_g = √Σ·Vᵀ·S⁻¹`` (stacked into one ``down``: the cached latent) and ``up_g = U·√Σ``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..decompose import ScaledSVD
from ..families import attention_modules, check_latent_support
from ..modules import projection_shape, projection_weight, replace_module
from ..scaling import Scaling
from .layout import AttentionLayout
from .metrics import head_metrics, root_and_inverse
from .modules import KeyPositionEmbeddings, LatentKVAttention, LatentProjection
from .plan import ROLES, KVPlan
from .quant import quantizer_shapes
from ..errors import InvalidInputError

GroupKey = tuple[str, str, int]  # (attention name, role, group)


def _rows_and_bias(model: nn.Module, layout: AttentionLayout, role: str):
    source = model.get_submodule(layout.source(role))
    rows = layout.rows(role)
    weight = projection_weight(source)[rows]
    bias = getattr(source, "bias", None)
    return weight, (bias[rows] if bias is not None else None)


def group_svds(
    model: nn.Module,
    layouts: list[AttentionLayout],
    scalings: dict[str, Scaling],
    group_size: int,
    grams: dict[str, torch.Tensor] | None = None,
) -> dict[GroupKey, ScaledSVD]:
    """One scaled SVD per (layer, role, head group); ``scalings`` and ``grams`` are keyed by source projection.

    With ``grams`` (input XᵀX/n), each group's rows are also weighted on the output side by the
    metric through which the layer reads them (see :mod:`.metrics`): SVD of M^½·W_g·S, up = M^-½·U·√Σ.
    """
    svds = {}
    for layout in layouts:
        width = group_size * layout.head_dim
        for role in ROLES:
            weight, _ = _rows_and_bias(model, layout, role)
            scaling = scalings[layout.source(role)]
            metrics = head_metrics(model, layout, role, (grams or {}).get(layout.source(role))) if grams is not None else None
            for g in range(layout.groups(group_size)):
                rows = weight[g * width : (g + 1) * width].detach().double()
                if metrics is None:
                    svds[(layout.name, role, g)] = ScaledSVD.of(rows, scaling)
                    continue
                root, inverse = root_and_inverse(torch.block_diag(*metrics[g * group_size : (g + 1) * group_size]))
                svd = ScaledSVD.of(root @ rows, scaling)
                svds[(layout.name, role, g)] = ScaledSVD(inverse @ svd.u, svd.sigma, svd.vh, svd.scaling)
    return svds


def _query_module(dense: nn.Module, layout: AttentionLayout) -> nn.Module | None:
    """For fused projections, the query rows as their own ``nn.Linear``; else ``None`` (keep q_proj)."""
    if not layout.fused:
        return None
    fused = getattr(dense, layout.fused)
    weight = projection_weight(fused)
    bias = getattr(fused, "bias", None)
    rows = layout.rows("query")
    query = nn.Linear(layout.hidden, layout.q_width, bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        query.weight.copy_(weight[rows])
        if bias is not None:
            query.bias.copy_(bias[rows])
    return query


def _install(model: nn.Module, built) -> None:
    """Swap in a ``LatentKVAttention`` for each ``(layout, {role: LatentProjection})`` that ``built`` yields.

    ``built`` is consumed lazily, so each layer's projections are made from its dense weights just
    before that layer is replaced. All layers share one ``KeyPositionEmbeddings``.
    """
    key_embeddings = None
    for layout, projections in built:
        dense = model.get_submodule(layout.name)
        if key_embeddings is None:
            rotary = layout.family.rotary_module(model)
            key_embeddings = KeyPositionEmbeddings(layout.family, rotary) if rotary is not None else None
        attention = LatentKVAttention(dense, layout, projections["key"], projections["value"],
                                      _query_module(dense, layout), key_embeddings)
        replace_module(model, layout.name, attention)


def apply_kv_plan(model: nn.Module, layouts: list[AttentionLayout], plan: KVPlan, svds: dict[GroupKey, ScaledSVD]) -> None:
    """Replace every planned attention module with a ``LatentKVAttention`` holding the factors."""

    def built():
        for layout in layouts:
            projections = {}
            for role in ROLES:
                weight, bias = _rows_and_bias(model, layout, role)
                factors = [svds[(layout.name, role, g)].factors(rank) for g, rank in enumerate(plan.ranks[layout.name][role])]
                projections[role] = LatentProjection.from_factors(factors, bias, dtype=weight.dtype, device=weight.device)
            yield layout, projections

    _install(model, built())


def replace_with_empty_latent(model: nn.Module, layouts: list[AttentionLayout], plan: KVPlan) -> None:
    """Swap in uninitialised ``LatentKVAttention`` modules of the planned ranks (used on load)."""
    by_name = {layout.name: layout for layout in layouts}
    unknown = [name for name in plan.ranks if name not in by_name]
    if unknown:
        raise InvalidInputError(f"The saved KV plan names attention {unknown[0]!r}, which this model does not have")

    def built():
        for name, roles in plan.ranks.items():
            layout = by_name[name]
            weight, bias = _rows_and_bias(model, layout, "key")
            width = plan.group_size * layout.head_dim
            yield layout, {
                role: LatentProjection(layout.hidden, roles[role], width, bias is not None, dtype=weight.dtype, device=weight.device)
                for role in ROLES
            }

    _install(model, built())


def expected_kv_shapes(model: nn.Module, layouts: list[AttentionLayout], plan: KVPlan,
                       quantized: bool = False) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes that a saved latent-KV model must hold for its plan (and its cache's scales)."""
    by_name = {layout.name: layout for layout in layouts}
    shapes = {}
    for name, roles in plan.ranks.items():
        layout = by_name.get(name)
        if layout is None:
            raise InvalidInputError(f"The saved KV plan names attention {name!r}, which this model does not have")
        source = model.get_submodule(layout.source("key"))
        has_bias = getattr(source, "bias", None) is not None
        width = plan.group_size * layout.head_dim
        for role, short in (("key", "k_proj"), ("value", "v_proj")):
            ranks = roles[role]
            shapes[f"{name}.{short}.down.weight"] = (sum(ranks), layout.hidden)
            for g, rank in enumerate(ranks):
                shapes[f"{name}.{short}.ups.{g}.weight"] = (width, rank)
                if has_bias:
                    shapes[f"{name}.{short}.ups.{g}.bias"] = (width,)
        if layout.fused:
            shapes[f"{name}.q_proj.weight"] = (layout.q_width, layout.hidden)
        if quantized:
            shapes.update(quantizer_shapes(name, sum(roles["key"]), sum(roles["value"])))
    return shapes


def find_attention_layers(model: nn.Module, purpose: str = "A latent KV cache") -> list[AttentionLayout]:
    """Every self-attention module whose K and V projections can be given a latent cache.

    Raises :class:`asvd_passes.families.UnsupportedModelError` for attention the family table does not cover.
    """
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
