"""Rank plans: which rank each selected projection gets, and the exact parameter ratio it achieves."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InvalidInputError


@dataclass(frozen=True)
class ProjectionShape:
    out_features: int
    in_features: int

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def max_rank(self) -> int:
        return min(self.out_features, self.in_features)

    def lowrank_params(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features)


@dataclass
class RankPlan:
    """``ranks[name]`` is the kept rank, or ``None`` where the projection stays dense."""

    shapes: dict[str, ProjectionShape]
    ranks: dict[str, int | None] = field(default_factory=dict)

    def kept_params(self, name: str) -> int:
        rank, shape = self.ranks.get(name), self.shapes[name]
        return shape.dense_params if rank is None else shape.lowrank_params(rank)

    @property
    def original_params(self) -> int:
        return sum(s.dense_params for s in self.shapes.values())

    @property
    def total_kept_params(self) -> int:
        return sum(self.kept_params(name) for name in self.shapes)

    @property
    def ratio(self) -> float:
        """Kept / original weight parameters over the selected projections (exact, from real ranks)."""
        return self.total_kept_params / self.original_params if self.shapes else 1.0

    @property
    def factored(self) -> dict[str, int]:
        return {name: rank for name, rank in self.ranks.items() if rank is not None}


def uniform_ratio_plan(shapes: dict[str, ProjectionShape], ratio: float, multiple: int = 1) -> RankPlan:
    """Every projection keeps r = floor(R·in·out/(in+out)); one that would not shrink stays dense.

    R = 1 keeps everything dense: its budget is the dense size, and where floor() leaves a sliver
    of saving (e.g. 64×32 → rank 21, 2016 of 2048 weights) factoring would cost accuracy for it.
    """
    if not 0.0 < ratio <= 1.0:
        raise InvalidInputError(f"param_ratio must lie in (0, 1], got {ratio}")
    if ratio == 1.0:
        return RankPlan(shapes, {name: None for name in shapes})
    ranks: dict[str, int | None] = {}
    for name, shape in shapes.items():
        rank = math.floor(ratio * shape.dense_params / (shape.in_features + shape.out_features))
        rank = max(multiple, rank - rank % multiple)  # rounded down to the kernel-friendly multiple
        ranks[name] = rank if shape.lowrank_params(rank) < shape.dense_params else None
    return RankPlan(shapes, ranks)


def explicit_plan(shapes: dict[str, ProjectionShape], ranks: dict[str, int], base: RankPlan | None = None) -> RankPlan:
    """Apply a ``{module_name: rank}`` map (on top of ``base`` if given); ranks up to min(in, out) are factored."""
    unknown = sorted(set(ranks) - set(shapes))
    if unknown:
        raise InvalidInputError(f"ranks map names modules that are not selected projections: {unknown[:5]}")
    plan = RankPlan(shapes, dict(base.ranks) if base else {name: None for name in shapes})
    for name, rank in ranks.items():
        if not 1 <= rank <= shapes[name].max_rank:
            raise InvalidInputError(f"rank {rank} for {name} outside [1, {shapes[name].max_rank}]")
        plan.ranks[name] = int(rank)
    return plan
