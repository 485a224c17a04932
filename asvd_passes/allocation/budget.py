"""Meet a parameter budget exactly by a global greedy over per-projection cost curves.

Each projection offers states "dense" (cost 0) and ranks r on a grid (cost ``cost(r)``, params
``r·(in+out)``). Taking, across all projections, the cheapest cost increase per parameter saved
is the classic separable knapsack heuristic; on the lower convex hull of each curve it is optimal
for the relaxed problem. The last move is refined rank step by rank step so the achieved ratio
lands within one step of one projection of the target.
"""

from __future__ import annotations

import heapq
from typing import Callable

from ..ranks import ProjectionShape, RankPlan


def rank_grid(shape: ProjectionShape, multiple: int) -> list[int]:
    """Ranks (multiples of ``multiple``) whose factored form is smaller than the dense matrix, descending."""
    top = shape.top_saving_rank
    top -= top % multiple
    return list(range(top, 0, -multiple))


def _lower_hull(points: list[tuple[int, float, int | None]]) -> list[tuple[int, float, int | None]]:
    """Lower convex hull of (params, cost, rank) points sorted by params descending (cost non-decreasing)."""
    hull: list[tuple[int, float, int | None]] = []
    for point in points:
        while len(hull) >= 2:
            (p1, c1, _), (p2, c2, _) = hull[-2], hull[-1]
            # Keep hull[-1] only if its slope from hull[-2] is below the slope to the new point.
            if (c2 - c1) * (p1 - point[0]) >= (point[1] - c1) * (p1 - p2):
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def greedy_plan(
    shapes: dict[str, ProjectionShape],
    cost: Callable[[str, int], float],
    ratio: float,
    multiple: int = 8,
) -> RankPlan:
    """Ranks minimising Σ cost(name, rank) subject to kept/original params ≤ ``ratio``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"param_ratio must lie in (0, 1], got {ratio}")
    plan = RankPlan(shapes, {name: None for name in shapes})
    budget = ratio * plan.original_params
    curves: dict[str, list[tuple[int, float, int | None]]] = {}
    heap: list[tuple[float, str, int]] = []
    for name, shape in shapes.items():
        grid = rank_grid(shape, multiple)
        points = [(shape.dense_params, 0.0, None)] + [(shape.lowrank_params(r), max(cost(name, r), 0.0), r) for r in grid]
        # Costs must not fall as rank falls; clamp tiny numerical noise.
        for i in range(1, len(points)):
            if points[i][1] < points[i - 1][1]:
                points[i] = (points[i][0], points[i - 1][1], points[i][2])
        curves[name] = points
        hull = _lower_hull(points)
        for (p1, c1, _), (p2, c2, r2) in zip(hull, hull[1:]):
            heapq.heappush(heap, ((c2 - c1) / max(p1 - p2, 1), name, r2))
    kept = float(plan.original_params)
    # Hull segments of one projection have increasing slopes, so popping by slope keeps them in order.
    while kept > budget and heap:
        _, name, target_rank = heapq.heappop(heap)
        current = plan.kept_params(name)
        after = shapes[name].lowrank_params(target_rank)
        if kept - (current - after) > budget:
            plan.ranks[name] = target_rank
            kept -= current - after
            continue
        # Last move: walk this projection's grid down only as far as the budget needs.
        for params, _, rank in curves[name]:
            if params < current and kept - (current - params) <= budget:
                plan.ranks[name] = rank
                kept -= current - params
                break
    return plan
