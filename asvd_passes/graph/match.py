"""Find the linear projections in a traced graph and group those that read the same tensor.

No per-family name lists: a projection is any ``aten.linear`` node, or an ``addmm``/``mm``/
``matmul`` whose right operand is a 2-D parameter (GPT-2's ``Conv1D``), and its name is the
module that owns it in ``nn_module_stack``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..errors import InvalidInputError

aten = torch.ops.aten
LINEAR_TARGETS = {aten.linear.default}
# (op, index of the input operand, index of the weight operand); weight laid out in × out.
MATMUL_TARGETS = {aten.addmm.default: (1, 2), aten.mm.default: (0, 1), aten.matmul.default: (0, 1)}
# Pure re-shapes between a tensor and the projection that reads it (Conv1D flattens to 2-D first).
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}


@dataclass
class Projection:
    name: str  # module qualified name, e.g. "model.layers.0.self_attn.q_proj"
    node: fx.Node  # the linear / addmm node in the graph
    input_node: fx.Node  # the tensor it reads (reshapes stripped)
    in_features: int
    out_features: int
    transposed: bool  # weight stored in × out (Conv1D)


@dataclass
class ProjectionGroup:
    """Projections that read one tensor (q/k/v; gate/up): one observer serves them all."""

    input_node: fx.Node
    projections: list[Projection]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.projections)

    @property
    def in_features(self) -> int:
        return self.projections[0].in_features


def _get_attr_tensor(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            value = gm.get_parameter(node.target)
        except AttributeError:
            try:
                value = gm.get_buffer(node.target)
            except AttributeError:
                return None
        return value if value.dim() == 2 else None
    return None


def _last_dim(node) -> int | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.shape[-1] if value is not None and value.dim() > 0 else None


def _strip_reshapes(node: fx.Node) -> fx.Node:
    """Look through flattening views that keep the channel (last) dimension, e.g. Conv1D's view(-1, in)."""
    while node.op == "call_function" and node.target in RESHAPES:
        source = node.args[0]
        if _last_dim(source) is None or _last_dim(source) != _last_dim(node):
            break
        node = source
    return node


def _owner(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]


def find_projections(gm: fx.GraphModule, model: nn.Module) -> list[Projection]:
    """Every linear projection of ``model`` found in ``gm`` (graph order, one entry per module)."""
    found: "OrderedDict[str, Projection]" = OrderedDict()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in LINEAR_TARGETS:
            x, weight_node, transposed = node.args[0], node.args[1], False
        elif node.target in MATMUL_TARGETS:
            xi, wi = MATMUL_TARGETS[node.target]
            x, weight_node, transposed = node.args[xi], node.args[wi], True
        else:
            continue
        weight = _get_attr_tensor(gm, weight_node)
        name = _owner(node)
        if weight is None or name is None:
            continue
        module = model.get_submodule(name) if name else model
        own_weight = getattr(module, "weight", None)
        if not isinstance(own_weight, torch.Tensor) or own_weight.data_ptr() != weight.data_ptr():
            continue  # a matmul with some other tensor inside a bigger module: not a projection
        out_features, in_features = weight.shape[::-1] if transposed else weight.shape
        if name in found:
            raise InvalidInputError(f"Module {name} is called more than once in the graph; cannot rewrite it")
        found[name] = Projection(name, node, _strip_reshapes(x), in_features, out_features, transposed)
    return list(found.values())


def output_projection_name(model: nn.Module) -> str | None:
    """Qualified name of the LM head (excluded from compression unless asked for)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def group_by_input(projections: list[Projection]) -> list[ProjectionGroup]:
    groups: "OrderedDict[fx.Node, ProjectionGroup]" = OrderedDict()
    for projection in projections:
        group = groups.setdefault(projection.input_node, ProjectionGroup(projection.input_node, []))
        group.projections.append(projection)
    return list(groups.values())
