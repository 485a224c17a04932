"""Graph passes (torch.fx ``PassBase``): each takes a graph module, does one thing, returns it.

* :class:`InsertObserversPass` adds one :class:`InputStatistics` per distinct projection input.
* :class:`RemoveObserversPass` takes them out again.
* :class:`LowRankRewritePass` replaces matched projection nodes by calls to ``LowRankLinear``.

Both pipelines use the observer passes for calibration and swap modules into the model for the
rewrite; the sequential pipeline also runs each block's graph rewritten by :class:`LowRankRewritePass`
to feed the next block.
"""

from __future__ import annotations

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .match import ProjectionGroup
from .observers import InputStatistics

OBSERVER_PREFIX = "asvd_observer_"
LOWRANK_PREFIX = "asvd_lowrank_"


def _attr_name(prefix: str, name: str) -> str:
    return prefix + name.replace(".", "__")


class InsertObserversPass(PassBase):
    """Insert a side-effect-only observer node after each group's shared input tensor."""

    def __init__(self, groups: list[ProjectionGroup], statistics: tuple[str, ...]):
        super().__init__()
        self.groups = groups
        self.statistics = statistics
        self.observers: dict[str, InputStatistics] = {}  # keyed by projection name

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        for index, group in enumerate(self.groups):
            observer = InputStatistics(group.in_features, self.statistics, group.names)
            attr = f"{OBSERVER_PREFIX}{index}"
            graph_module.add_submodule(attr, observer)
            with graph_module.graph.inserting_after(group.input_node):
                graph_module.graph.call_module(attr, (group.input_node,))
            for name in group.names:
                self.observers[name] = observer
        graph_module.recompile()
        return PassResult(graph_module, bool(self.groups))


class RemoveObserversPass(PassBase):
    def call(self, graph_module: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(graph_module.graph.nodes):
            if node.op == "call_module" and str(node.target).startswith(OBSERVER_PREFIX):
                graph_module.graph.erase_node(node)
                graph_module.delete_submodule(node.target)
                modified = True
        graph_module.recompile()
        return PassResult(graph_module, modified)


class LowRankRewritePass(PassBase):
    """Replace each projection node named in ``replacements`` with a call to its low-rank module.

    The new node reads the projection's original operand (for ``Conv1D``'s ``addmm`` the
    flattened 2-D view), so the surrounding graph is untouched.
    """

    def __init__(self, projections, replacements: dict[str, nn.Module]):
        super().__init__()
        self.projections = {p.name: p for p in projections}
        self.replacements = replacements

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        for name, module in self.replacements.items():
            projection = self.projections[name]
            node = projection.node
            operand = node.args[1] if projection.transposed and len(node.args) == 3 else node.args[0]
            attr = _attr_name(LOWRANK_PREFIX, name)
            graph_module.add_submodule(attr, module)
            with graph_module.graph.inserting_before(node):
                new_node = graph_module.graph.call_module(attr, (operand,))
            new_node.meta = dict(node.meta)
            node.replace_all_uses_with(new_node)
            graph_module.graph.erase_node(node)
            projection.node = new_node
        graph_module.recompile()
        return PassResult(graph_module, bool(self.replacements))
