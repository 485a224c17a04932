"""The latent KV cache: a ``DynamicCache`` whose layers hold (batch, seq, r) latents, never full K/V.

``LatentKVAttention`` hands the cache its K and V latents, shaped (batch, 1, seq, r), in place of
K and V (batch, heads, seq, head_dim): the standard layers (plain or sliding-window, both
concatenating along axis -2) then store exactly ``batch·seq·r`` numbers per layer, so
``generate``'s own ``DynamicCache`` already works as a latent cache.
``LatentCache`` adds a check that nothing full-width is stored and byte accounting.
"""

from __future__ import annotations

from transformers.cache_utils import DynamicCache


def cache_nbytes(cache) -> int:
    """Bytes held by every tensor a cache keeps across steps (keys and values of all layers)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


class LatentCache(DynamicCache):
    """A ``DynamicCache`` for latent-KV models: stores the K and V latents (batch, 1, seq, r) of each layer."""

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if any(t.dim() != 4 or t.shape[1] != 1 for t in (key_states, value_states)):
            raise ValueError(
                f"LatentCache stores (batch, 1, seq, rank) latents; layer {layer_idx} gave shapes "
                f"{tuple(key_states.shape)} / {tuple(value_states.shape)} (is the model latent-KV compressed?)"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def nbytes(self) -> int:
        return cache_nbytes(self)
