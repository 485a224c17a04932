"""Latent KV cache: K/V projections factored so the cache keeps only their low-rank latents."""

from . import quant
from .cache import cache_nbytes
from .layout import AttentionLayout
from .modules import LatentKVAttention, LatentProjection
from .plan import KVPlan, greedy_kv_plan, resolve_group_size, uniform_kv_plan
from .rewrite import apply_kv_plan, find_attention_layers, expected_kv_shapes, group_svds, replace_with_empty_latent

__all__ = [
    "AttentionLayout",
    "KVPlan",
    "LatentKVAttention",
    "LatentProjection",
    "apply_kv_plan",
    "cache_nbytes",
    "expected_kv_shapes",
    "find_attention_layers",
    "greedy_kv_plan",
    "group_svds",
    "replace_with_empty_latent",
    "resolve_group_size",
    "uniform_kv_plan",
]
