"""Loss sensitivity of each projection's output, from a few gradient passes (diagonal Fisher).

For a small perturbation δy of projection p's output, the loss moves by about
½·Σ_c E[g_c²]·E[δy_c²] where g = ∂loss/∂y (diagonal Fisher approximation). So the mean squared
gradient per output channel, ``fisher[p]`` (out_features,), weighs how much each projection's
output error costs in final loss, which is what a budget should trade between layers.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


def gradient_moment(grad: torch.Tensor, covariance: bool) -> torch.Tensor:
    """Σ over tokens of g² per output channel, or of g·gᵀ (out × out) with ``covariance``, in float64."""
    flat = grad.detach().reshape(-1, grad.shape[-1]).double()
    return flat.T @ flat if covariance else flat.pow(2).sum(0)


def output_fisher(model: nn.Module, names: list[str], windows: torch.Tensor, progress: bool = True,
                  covariance: bool = False) -> dict[str, torch.Tensor]:
    """Mean over tokens of (∂ mean-token-loss / ∂ output)² per output channel, for each named module;
    with ``covariance``, the whole out × out matrix E[g·gᵀ] (its diagonal is the former)."""
    sums = {name: None for name in names}
    tokens = 0
    handles = []

    def make_hook(name):
        def record(grad):
            flat = gradient_moment(grad, covariance)
            sums[name] = flat if sums[name] is None else sums[name] + flat

        def hook(module, inputs, output):
            if output.requires_grad:
                output.register_hook(record)

        return hook

    requires = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name in names:
            module = model.get_submodule(name)
            for p in module.parameters():
                p.requires_grad_(True)
            handles.append(module.register_forward_hook(make_hook(name)))
        model.eval()
        for row in tqdm(windows, desc="sensitivity", disable=not progress):
            ids = row[None].to(next(model.parameters()).device)
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                # Scale to a sum over tokens so that every window weighs the same per token.
                (loss * (ids.shape[1] - 1)).backward()
            tokens += ids.shape[1] - 1
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in requires.items():
            p.grad = None
            p.requires_grad_(flag)
    missing = [name for name, value in sums.items() if value is None]
    if missing:
        raise RuntimeError(f"No gradient reached {missing[:3]}: are these modules used by the forward pass?")
    return {name: value / tokens for name, value in sums.items()}
