"""Re-run a model from decoder block i on, reusing cached block outputs for the blocks before it.

A probe that changes one projection in block i only changes blocks i and later, so the inputs of
every block are recorded once and the blocks before i replay their recorded outputs. The blocks are
found by :func:`asvd_passes.families.decoder_blocks`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import InvalidInputError
from ..families import decoder_blocks


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder_blocks(model)[1]


def block_index(model: nn.Module, module_name: str) -> int:
    """Index of the decoder block that contains ``module_name``."""
    prefix, _ = decoder_blocks(model)
    rest = module_name[len(prefix) + 1 :] if module_name.startswith(prefix + ".") else ""
    head = rest.split(".")[0]
    if not head.isdigit():
        raise InvalidInputError(f"{module_name} is not inside a decoder block")
    return int(head)


class BlockReplay:
    """``loss_from(i)``: mean token NLL of ``windows`` when blocks < i replay cached outputs."""

    def __init__(self, model: nn.Module, windows: torch.Tensor):
        self.model = model
        self.windows = windows.to(next(model.parameters()).device)
        self.layers = decoder_layers(model)
        self.outputs: list = [None] * len(self.layers)
        handles = [
            layer.register_forward_hook(self._recorder(i)) for i, layer in enumerate(self.layers)
        ]
        try:
            self.dense_loss = self._loss()
        finally:
            for handle in handles:
                handle.remove()

    def _recorder(self, index):
        def hook(module, inputs, output):
            self.outputs[index] = output

        return hook

    @torch.no_grad()
    def _loss(self) -> float:
        ids = self.windows
        return self.model(input_ids=ids, labels=ids, use_cache=False).loss.item()

    @contextmanager
    def _replaying(self, start: int):
        patched = []
        try:
            for index in range(start):
                layer = self.layers[index]
                output = self.outputs[index]
                layer.forward = lambda *args, _output=output, **kwargs: _output
                patched.append(layer)
            yield
        finally:
            for layer in patched:
                del layer.forward  # back to the class's forward

    def loss_from(self, start: int) -> float:
        with self._replaying(start):
            return self._loss()

    def ppl_from(self, start: int) -> float:
        return math.exp(self.loss_from(start))
