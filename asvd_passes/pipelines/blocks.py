"""Decoder blocks as units of work: find them, record what each is called with, capture one as a graph.

A block is called as ``block(hidden_states, *args, **kwargs)`` and returns the next hidden states
(transformers 5 decoder layers return a tensor). Everything but ``hidden_states`` (masks, position
embeddings, position ids) depends only on the window length, so it is recorded once per block from
one forward in which every block passes its input straight through: no block weights are needed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..allocation.block_cache import decoder_layers
from ..graph.trace import TraceError


@dataclass
class BlockCall:
    """What one block is called with besides its hidden states."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def to(self, device, dtype: torch.dtype | None = None) -> "BlockCall":
        """On ``device``; floating tensors (position embeddings, additive masks) also in ``dtype``."""
        def move(value):
            if not isinstance(value, torch.Tensor):
                return value
            return value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)

        tree = torch.utils._pytree.tree_map
        return BlockCall(tree(move, self.args), tree(move, self.kwargs))


class _StopForward(Exception):
    pass


def block_prefix(model: nn.Module) -> str:
    """Qualified name of the decoder blocks' ``ModuleList`` (e.g. ``model.layers``)."""
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


@contextmanager
def _patched_forwards(layers: nn.ModuleList, make_forward):
    try:
        for index, layer in enumerate(layers):
            layer.forward = make_forward(index)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)  # back to the class's forward


@torch.no_grad()
def record_block_inputs(model: nn.Module, windows: torch.Tensor, device) -> tuple[list[torch.Tensor], list[BlockCall]]:
    """Hidden states entering block 0 for every window, and every block's other call arguments.

    Only the embeddings and whatever the model computes before its blocks run (positions, masks,
    rotary tables) are executed; the blocks themselves may still be on the meta device.
    """
    layers = decoder_layers(model)
    calls: list[BlockCall | None] = [None] * len(layers)
    hidden: list[torch.Tensor] = []
    recording_calls = True

    def make_forward(index):
        def forward(hidden_states, *args, **kwargs):
            if index == 0:
                hidden.append(hidden_states.detach().cpu())
            if recording_calls:
                calls[index] = BlockCall(tuple(args), dict(kwargs))
            if index == len(layers) - 1 or not recording_calls:
                raise _StopForward
            return hidden_states

        return forward

    with _patched_forwards(layers, make_forward):
        for row in windows:
            try:
                model(input_ids=row[None].to(device), use_cache=False)
            except _StopForward:
                pass
            recording_calls = False
    missing = [i for i, call in enumerate(calls) if call is None]
    if missing:
        raise RuntimeError(f"decoder blocks {missing[:3]} were never called by {type(model).__name__}.forward")
    return hidden, [BlockCall(*_detach(call.args, call.kwargs)) for call in calls]


def _detach(args, kwargs):
    detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
    tree = torch.utils._pytree.tree_map
    return tree(detach, args), tree(detach, kwargs)


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    output = block(hidden, *call.args, **call.kwargs)
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{type(block).__name__} returned {type(output).__name__}; expected the hidden-states tensor")
    return output


def capture_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> fx.GraphModule:
    """``torch.export`` one decoder block on its real inputs; the graph runs on the block's parameters."""
    try:
        with torch.no_grad():
            program = torch.export.export(block, (hidden,) + tuple(call.args), dict(call.kwargs), strict=False)
    except Exception as err:  # torch.export raises many types; name the block in one clear error
        raise TraceError(f"torch.export could not trace {type(block).__name__}: {err}") from err
    return program.module()
