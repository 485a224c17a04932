"""What both pipelines decide the same way: the weight rank plan, the KV plan, and the mean Gram matrices.

The pipelines differ in how they measure (the whole model at once, or block by block) and hand in
what they measured: an allocator for the configured budget, KV costs, observer statistics.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import kv
from ..config import ASVDConfig
from ..ranks import ProjectionShape, RankPlan, explicit_plan, uniform_ratio_plan


def weight_plan(config: ASVDConfig, shapes: dict[str, ProjectionShape], allocate: Callable[[], RankPlan]) -> RankPlan:
    """The ranks ``config`` asks for: none, an explicit map, one uniform ratio, or ``allocate()`` (the
    pipeline's measured allocation, called only when needed); an explicit map overrides what it names."""
    if not config.compresses_weights:
        return RankPlan({}, {})
    if config.ranks and config.param_ratio is None:
        return explicit_plan(shapes, config.ranks)
    if config.allocation == "uniform":
        plan = uniform_ratio_plan(shapes, config.param_ratio, config.rank_multiple)
    else:
        plan = allocate()
    return explicit_plan(shapes, config.ranks, plan) if config.ranks else plan


def kv_plan(config: ASVDConfig, layouts, group_size: int, costs: Callable[[], dict],
            dtype_bytes: int = 4) -> "kv.KVPlan | None":
    """The latent widths ``config`` asks for (``None`` without latent K/V); ``costs()`` is called for fisher only."""
    if not layouts:
        return None
    if config.kv_budget is not None:
        return kv.plan.budget_kv_plan(layouts, costs(), config.kv_budget, dtype_bytes, group_size,
                                      config.rank_multiple)
    if config.kv_allocation == "uniform":
        plan = kv.uniform_kv_plan(layouts, config.kv_ratio, group_size, config.rank_multiple)
    else:
        plan = kv.greedy_kv_plan(layouts, costs(), config.kv_ratio, group_size, config.rank_multiple)
    plan.bits = config.kv_bits
    return plan


def mean_grams(statistics: dict, names) -> dict[str, torch.Tensor]:
    """E[xxᵀ] of every named input whose observer kept XᵀX."""
    return {name: statistics[name].gram / statistics[name].count
            for name in names if name in statistics and statistics[name].gram is not None}
