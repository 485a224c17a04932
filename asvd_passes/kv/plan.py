"""KV rank plans: per attention layer, per role (key / value), per head group, the latent rank.

The KV ratio is what the cache saves: Σ latent widths / Σ dense K+V widths, counted exactly from
the ranks. ``uniform`` gives every group ``floor(ratio·group_width)``; ``fisher`` prices every rank
of every group with the closed-form loss cost of the weight allocation (discarded whitened
spectrum × diagonal Fisher of the projection's output) and runs a global greedy over cache width,
so K and V, and early and late layers, get different ranks.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from ..allocation.budget import _lower_hull
from ..errors import InvalidInputError
from .layout import AttentionLayout

ROLES = ("key", "value")


@dataclass
class KVPlan:
    group_size: int
    widths: dict[str, int]  # attention name -> dense K (= V) width
    ranks: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # name -> role -> per-group ranks
    bits: int | None = None  # stored bits of the cached latents (kv/quant.py); None: the model's float dtype

    def latent_width(self, name: str, role: str) -> int:
        return sum(self.ranks[name][role])

    @property
    def dense_width(self) -> int:
        return 2 * sum(self.widths.values())

    @property
    def total_latent_width(self) -> int:
        return sum(self.latent_width(n, r) for n in self.ranks for r in ROLES)

    @property
    def ratio(self) -> float:
        return self.total_latent_width / self.dense_width

    def role_ratio(self, role: str) -> float:
        return sum(self.latent_width(n, role) for n in self.ranks) / sum(self.widths.values())

    def to_dict(self) -> dict:
        return {"group_size": self.group_size, "layers": {n: {r: list(v) for r, v in roles.items()} for n, roles in self.ranks.items()}}

    @classmethod
    def from_dict(cls, data: dict, layouts: list[AttentionLayout]) -> "KVPlan":
        widths = {layout.name: layout.kv_width for layout in layouts}
        return cls(int(data["group_size"]), widths, {n: {r: [int(x) for x in v] for r, v in roles.items()} for n, roles in data["layers"].items()})


def resolve_group_size(layouts: list[AttentionLayout], group_size: int | None) -> int:
    """``None`` means one group of all KV heads; otherwise it must divide every layer's KV heads."""
    if group_size is None:
        sizes = {layout.kv_heads for layout in layouts}
        if len(sizes) != 1:
            raise InvalidInputError(f"layers have different KV head counts {sorted(sizes)}; give kv_group_size")
        return sizes.pop()
    for layout in layouts:
        layout.groups(group_size)
    return group_size


def _max_rank(layout: AttentionLayout, group_size: int) -> int:
    return min(group_size * layout.head_dim, layout.hidden)


def uniform_kv_plan(layouts: list[AttentionLayout], ratio: float, group_size: int, multiple: int = 1) -> KVPlan:
    check_ratio(ratio)
    plan = KVPlan(group_size, {layout.name: layout.kv_width for layout in layouts})
    for layout in layouts:
        top = _max_rank(layout, group_size)
        rank = max(multiple, math.floor(ratio * group_size * layout.head_dim) // multiple * multiple)
        rank = min(rank, top)
        plan.ranks[layout.name] = {role: [rank] * layout.groups(group_size) for role in ROLES}
    return plan


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise InvalidInputError(f"kv_ratio must lie in (0, 1], got {ratio}")


def greedy_kv_plan(
    layouts: list[AttentionLayout],
    costs: dict[tuple[str, str, int], list[float]],
    ratio: float,
    group_size: int,
    multiple: int = 1,
) -> KVPlan:
    """Ranks minimising Σ cost subject to Σ latent widths ≤ ratio · Σ dense widths.

    ``costs[(name, role, group)][r]`` is the predicted loss increase of keeping rank r (index up to
    the group's max rank, where it is 0). Greedy on each curve's lower convex hull by cost per
    latent column saved; the last move steps down one rank multiple at a time so the achieved
    width lands within one step of one group of the budget.
    """
    check_ratio(ratio)
    plan = KVPlan(group_size, {layout.name: layout.kv_width for layout in layouts})
    budget = ratio * plan.dense_width
    current: dict[tuple, int] = {}
    grids: dict[tuple, list[tuple[int, float]]] = {}
    heap: list[tuple[float, tuple, int]] = []
    for layout in layouts:
        top = _max_rank(layout, group_size)
        for role in ROLES:
            for g in range(layout.groups(group_size)):
                key = (layout.name, role, g)
                curve = costs[key]
                ranks = [top] + [r for r in range(top - top % multiple, 0, -multiple) if r < top]
                points, worst = [], 0.0
                for r in ranks:  # cost may not fall as rank falls
                    worst = max(worst, float(curve[min(r, len(curve) - 1)]))
                    points.append((r, worst))
                grids[key] = points
                current[key] = top
                # Same hull as the weight budget's, with the latent columns kept as the size.
                hull = _lower_hull([(r, c, r) for r, c in points])
                for (r1, c1, _), (r2, c2, _) in zip(hull, hull[1:]):
                    heapq.heappush(heap, ((c2 - c1) / (r1 - r2), key, r2))
    kept = float(sum(current.values()))
    while kept > budget and heap:
        _, key, target = heapq.heappop(heap)
        if kept - (current[key] - target) > budget:
            kept -= current[key] - target
            current[key] = target
            continue
        for rank, _ in grids[key]:
            if rank < current[key] and kept - (current[key] - rank) <= budget:
                kept -= current[key] - rank
                current[key] = rank
                break
    for layout in layouts:
        plan.ranks[layout.name] = {
            role: [current[(layout.name, role, g)] for g in range(layout.groups(group_size))] for role in ROLES
        }
    return plan


def fisher_kv_costs(layouts: list[AttentionLayout], svds: dict, fisher: dict, statistics: dict, group_size: int) -> dict:
    """``costs[(name, role, group)]``: the closed-form loss cost of every rank of every K/V group.

    ``fisher`` and ``statistics`` are keyed by source projection; a group reads its rows of both.
    """
    from ..allocation.fisher import loss_cost_curve

    by_name = {layout.name: layout for layout in layouts}
    costs = {}
    for (name, role, g), svd in svds.items():
        layout = by_name[name]
        source = layout.source(role)
        width = group_size * layout.head_dim
        rows = fisher[source][layout.rows(role)][g * width : (g + 1) * width]
        stats = statistics.get(source)
        gram = stats.gram / stats.count if stats is not None and stats.gram is not None else None
        costs[(name, role, g)] = loss_cost_curve(svd, rows, gram).tolist()
    return costs


# Quantization noise priced like truncation. In the closed-form cost, latent channel k of a whitened
# SVD (E[l_k²] = σ_k) contributes terms_k = σ_k²·(output weight) when dropped; noise of variance ν_k on
# it costs terms_k·ν_k/σ_k. A b-bit code over a range of RANGE_OVER_STD standard deviations has
# ν = (range / (2^b − 1))² / 12, so keeping a channel at b bits costs NOISE[b] of dropping it.
# RANGE_OVER_STD = 2·√(2·ln n) is the expected range of n = 8192 Gaussian calibration values (16×512):
# a prior, not a measurement; heavier tails make real ranges wider (clipping narrows them at 4 bits).
RANGE_OVER_STD = 2 * math.sqrt(2 * math.log(16 * 512))
NOISE = {bits: RANGE_OVER_STD ** 2 / (12 * (2 ** bits - 1) ** 2) for bits in (8, 4)}
BUDGET_BITS = (None, 8, 4)  # float (the model's dtype), 8 and 4 bits


def latent_budget(budget_bytes: float, bits: int | None, dtype_bytes: int, latents: int) -> int:
    """Latent numbers per token that fit ``budget_bytes`` when stored at ``bits`` (4 bits: one padding
    nibble per latent of odd width, counted for all ``latents``)."""
    if bits is None:
        return math.floor(budget_bytes / dtype_bytes)
    if bits == 8:
        return math.floor(budget_bytes)
    return math.floor(2 * budget_bytes) - latents


def smallest_budget(layouts: list[AttentionLayout], group_size: int, multiple: int) -> int:
    """Bytes per token of the smallest plan: every group at its smallest rank, 4 bits."""
    return sum(math.ceil(layout.groups(group_size) * multiple / 2) for layout in layouts for _ in ROLES)


def check_budget(config, layouts: list[AttentionLayout], dtype_bytes: int) -> None:
    """A ``kv_budget`` no plan can meet is an error before any work."""
    if config.kv_budget is None:
        return
    group_size = resolve_group_size(layouts, config.kv_group_size)
    smallest = smallest_budget(layouts, group_size, config.rank_multiple)
    if config.kv_budget < smallest:
        raise InvalidInputError(
            f"kv_budget {config.kv_budget:g} bytes per token is below the smallest latent cache this model can have "
            f"({smallest} bytes: rank {config.rank_multiple} per head group, 4 bits); the dense cache holds "
            f"{2 * sum(l.kv_width for l in layouts) * dtype_bytes}")


def predicted_cost(plan: KVPlan, costs: dict, bits: int | None) -> float:
    """Closed-form loss of a plan: truncated channels' costs + the noise of the kept ones at ``bits``."""
    total = 0.0
    for name, roles in plan.ranks.items():
        for role, ranks in roles.items():
            for g, rank in enumerate(ranks):
                curve = costs[(name, role, g)]
                truncated = float(curve[min(rank, len(curve) - 1)])
                total += truncated + (NOISE[bits] * (float(curve[0]) - truncated) if bits is not None else 0.0)
    return total


def budget_kv_plan(layouts: list[AttentionLayout], costs: dict, budget_bytes: float, dtype_bytes: int,
                   group_size: int, multiple: int = 1) -> KVPlan:
    """Ranks and one storage for all latents under ``budget_bytes`` cache bytes per token, least predicted loss.

    For each storage (float, 8, 4 bits) the budget buys a latent width; the fisher greedy spends it on
    ranks; the plan's predicted loss adds the quantization noise of what it keeps (:data:`NOISE`).
    """
    dense_width = 2 * sum(layout.kv_width for layout in layouts)
    latents = 2 * len(layouts)
    best = None
    for bits in BUDGET_BITS:
        width = latent_budget(budget_bytes, bits, dtype_bytes, latents)
        floor = sum(layout.groups(group_size) * multiple for layout in layouts) * len(ROLES)
        if width < floor:
            continue
        plan = greedy_kv_plan(layouts, costs, min(1.0, width / dense_width), group_size, multiple)
        plan.bits = bits
        cost = predicted_cost(plan, costs, bits)
        if best is None or cost < best[0]:
            best = (cost, plan)
    if best is None:  # check_budget refuses this before any work; kept for direct callers
        raise InvalidInputError(f"kv_budget {budget_bytes:g} bytes per token is below the smallest latent cache")
    return best[1]
