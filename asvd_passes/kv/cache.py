"""Bytes held by a KV cache: what ``asvd inspect`` and the tests measure.

``LatentKVAttention`` hands the cache its K and V latents, shaped (batch, 1, seq, r), in place of
K and V (batch, heads, seq, head_dim): the standard layers (plain or sliding-window, both
concatenating along axis -2) then store exactly ``batch·seq·r`` numbers per layer, so
``generate``'s own ``DynamicCache`` already works as a latent cache.
"""

from __future__ import annotations


def cache_nbytes(cache) -> int:
    """Bytes held by every tensor a cache keeps across steps (keys and values of all layers)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total
