"""One ``torch.export`` capture per distinct block structure, rebound to each block's own tensors.

Decoder blocks share their code; only their parameters differ. Capturing a block costs seconds
(``torch.export`` traces Python), running it milliseconds, so :class:`BlockGraphs` captures the
first block of each structure and gives every later block a copy of that graph whose parameters
and buffers are the block's own. Structure is what the graph can depend on besides tensors: the
module tree, parameter shapes and dtypes, and the plain attributes of every submodule (a sliding
window, a layer type), minus the layer index. Code that reads the layer index, or anything else
outside that signature, is caught by running the rebound graph once against the block itself:
a block whose graph disagrees is captured on its own.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .blocks import BlockCall, capture_block, run_block

# transformers names a block's position in the stack ``layer_idx``; with ``use_cache=False`` only the
# cache reads it, and the output check covers any other use.
_POSITION_ATTRIBUTES = frozenset({"layer_idx"})
_PLAIN = (bool, int, float, str, type(None))


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def structure(block: nn.Module) -> tuple:
    """What a captured graph of ``block`` may depend on besides its tensors' values."""
    modules = []
    for name, module in block.named_modules():
        attributes = tuple(sorted(
            (key, repr(value)) for key, value in vars(module).items()
            if not key.startswith("_") and key not in _POSITION_ATTRIBUTES and key != "training" and _plain(value)))
        modules.append((name, type(module).__qualname__, attributes))
    tensors = tuple((name, tuple(t.shape), t.dtype, t.device.type)
                    for name, t in list(block.named_parameters()) + list(block.named_buffers()))
    return tuple(modules), tensors


class _Template:
    """A captured graph without its block's tensors: the graph and the attributes it owns (constants, guards)."""

    def __init__(self, graph_module: fx.GraphModule, block: nn.Module, signature: tuple):
        # A copy: the captured graph's owning module holds the captured block's tensors (freed after use).
        self.graph = _copy_graph(graph_module.graph)
        self.signature = signature
        owned = {name for name, _ in block.named_parameters()} | {name for name, _ in block.named_buffers()}
        self.constants = {}
        for node in self.graph.nodes:
            if node.op in ("get_attr", "call_module") and node.target not in owned:
                self.constants[node.target] = _attribute(graph_module, node.target)

    def bind(self, block: nn.Module) -> fx.GraphModule:
        """A fresh graph module (its own graph, free to rewrite) running on ``block``'s tensors."""
        tensors = dict(block.named_parameters())
        tensors.update(block.named_buffers())
        root = {}
        for node in self.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                root[node.target] = self.constants[node.target] if node.target in self.constants else tensors[node.target]
        return fx.GraphModule(root, _copy_graph(self.graph))


def _attribute(module: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """New nodes (metadata shallow-copied) sharing ``graph``'s calling convention (its pytree specs,
    which nothing rewrites; ``copy.deepcopy`` would rebuild them through deprecated pytree paths)."""
    copied = fx.Graph()
    value, output = copied.graph_copy(graph, {}, return_output_node=True)
    copied._codegen = graph._codegen
    copied.output(value, type_expr=getattr(output, "type", None)).meta = dict(output.meta)
    return copied


class BlockGraphs:
    """Block graphs for one pipeline run: ``capture(block, hidden, call)`` returns a graph of ``block``
    that the caller may rewrite; the work of ``torch.export`` is done once per distinct structure."""

    def __init__(self):
        self._templates: list[_Template] = []
        # Each block's checked template, bound again in later passes (the block is held: its id stays its own).
        self._chosen: dict[int, tuple[nn.Module, _Template]] = {}
        self.captures = 0

    def capture(self, block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> fx.GraphModule:
        signature = structure(block)
        _, chosen = self._chosen.get(id(block), (None, None))
        if chosen is not None and chosen.signature == signature:
            return chosen.bind(block)
        expected = None
        for template in self._templates:
            if template.signature != signature:
                continue
            graph = template.bind(block)
            with torch.no_grad():
                if expected is None:
                    expected = run_block(block, hidden, call)
                if _agrees(graph(hidden, *call.args, **call.kwargs), expected):
                    self._chosen[id(block)] = (block, template)
                    return graph
        template = _Template(capture_block(block, hidden, call), block, signature)
        self.captures += 1
        self._templates.append(template)
        self._chosen[id(block)] = (block, template)
        return template.bind(block)


def _agrees(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """The same output up to a few roundings (a structural difference moves it far more)."""
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return bool(((got - expected).abs().max() <= 16 * torch.finfo(expected.dtype).eps * scale).item())
