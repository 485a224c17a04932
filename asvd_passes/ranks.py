"""Rank plans: which rank each selected projection gets, and the exact parameter ratio it achieves."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InvalidInputError
from .modules import interpolative_form


@dataclass(frozen=True)
class ProjectionShape:
    """A selected projection's shape, and the storage form its factors will take (``LowRankLinear``)."""

    out_features: int
    in_features: int
    interpolative: bool = False

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def max_rank(self) -> int:
        return min(self.out_features, self.in_features)

    def lowrank_params(self, rank: int) -> int:
        params = rank * (self.out_features + self.in_features)
        return params - rank * rank if interpolative_form(rank, self.out_features, self.interpolative) else params

    @property
    def top_saving_rank(self) -> int:
        """The largest rank whose factors are smaller than the dense matrix (0 if none is)."""
        if self.interpolative:  # r·(in + out − r) < in·out  ⇔  r < min(in, out)
            return self.max_rank - 1
        return (self.dense_params - 1) // (self.in_features + self.out_features)

    def rank_for_params(self, params: float) -> int:
        """The largest rank (≥ 0) whose factors take at most ``params`` parameters."""
        if not self.interpolative:
            return max(0, math.floor(params / (self.in_features + self.out_features)))
        # r² − (in + out)·r + params ≥ 0, smaller root; then step for rounding at the edges.
        total = self.in_features + self.out_features
        rank = max(0, min(self.max_rank, math.floor((total - math.sqrt(max(total * total - 4 * params, 0.0))) / 2)))
        while rank > 0 and self.lowrank_params(rank) > params:
            rank -= 1
        while rank < self.max_rank and self.lowrank_params(rank + 1) <= params:
            rank += 1
        return rank

    def with_form(self, interpolative: bool) -> "ProjectionShape":
        return ProjectionShape(self.out_features, self.in_features, interpolative)


def shapes_in_form(shapes: dict[str, ProjectionShape], interpolative: bool) -> dict[str, ProjectionShape]:
    """The same shapes with their factors stored in the given form (the budget counts what is stored)."""
    return {name: shape.with_form(interpolative) for name, shape in shapes.items()}


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
        rank = shape.rank_for_params(ratio * shape.dense_params)
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
