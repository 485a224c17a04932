"""Capture a causal LM as an FX graph with ``torch.export`` (HF's own fx tracer is gone in transformers 5).

The whole model is captured once with a fixed example batch: every projection appears as an
``aten`` node whose ``nn_module_stack`` names its module, and ``ep.module()`` runs the graph with
the model's own parameters (no copies).
"""

from __future__ import annotations

import torch
from torch import fx

from ..errors import ASVDError


class TraceError(ASVDError, RuntimeError):
    """torch.export could not capture the model."""


def capture(model: torch.nn.Module, input_ids: torch.Tensor) -> fx.GraphModule:
    """Export ``model(input_ids=..., use_cache=False)`` and return the runnable graph module."""
    kwargs = {"input_ids": input_ids, "use_cache": False}
    try:
        with torch.no_grad():
            program = torch.export.export(model, (), kwargs, strict=False)
    except Exception as err:  # torch.export raises many types; name the model in one clear error
        raise TraceError(f"torch.export could not trace {type(model).__name__}: {err}") from err
    return program.module()
