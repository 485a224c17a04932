import math

import pytest

from asvd_passes.allocation.budget import greedy_plan, rank_grid
from asvd_passes.ranks import ProjectionShape

SHAPES = {
    "a": ProjectionShape(64, 64),
    "b": ProjectionShape(128, 64),
    "c": ProjectionShape(32, 64),
}


def tail_cost(weight):
    # A convex, decreasing error curve: error of keeping rank r out of max 64 (geometric spectrum).
    return lambda name, rank: weight[name] * sum(0.9**k for k in range(rank, 64))


@pytest.mark.parametrize("interpolative", [False, True])
def test_rank_grid_only_ranks_that_save_parameters(interpolative):
    shape = ProjectionShape(64, 64, interpolative)
    grid = rank_grid(shape, 8)
    assert grid == sorted(grid, reverse=True) and all(r % 8 == 0 for r in grid)
    assert all(shape.lowrank_params(r) < shape.dense_params for r in grid)
    assert shape.lowrank_params(grid[0] + 8) >= shape.dense_params
    # Two factors stop saving at half the width; the interpolative form saves up to full rank.
    assert grid[0] == (56 if interpolative else 24)


@pytest.mark.parametrize("shape", [ProjectionShape(64, 64, True), ProjectionShape(96, 32, True),
                                   ProjectionShape(32, 96, True), ProjectionShape(50, 7, False)])
def test_rank_for_params_is_the_largest_rank_within_the_params(shape):
    for params in range(0, shape.dense_params + 1, 37):
        rank = shape.rank_for_params(params)
        assert rank == max([r for r in range(shape.max_rank + 1) if shape.lowrank_params(r) <= params])


@pytest.mark.parametrize("ratio", [0.9, 0.8, 0.6])
def test_interpolative_budget_buys_lower_cost(ratio):
    """The same budget in the interpolative form keeps more of every curve: a strictly lower total cost."""
    cost = tail_cost({"a": 1.0, "b": 1.0, "c": 1.0})
    total = lambda plan: sum(cost(name, plan.ranks[name] or SHAPES[name].max_rank) for name in SHAPES)  # noqa: E731
    pair = greedy_plan(SHAPES, cost, ratio, multiple=1)
    interpolative = greedy_plan({name: shape.with_form(True) for name, shape in SHAPES.items()}, cost, ratio, multiple=1)
    assert interpolative.ratio <= ratio + 1e-12
    assert total(interpolative) < total(pair)


@pytest.mark.parametrize("ratio", [0.95, 0.9, 0.8, 0.5, 0.3])
def test_greedy_meets_budget_within_one_rank_step(ratio):
    plan = greedy_plan(SHAPES, tail_cost({"a": 1.0, "b": 1.0, "c": 1.0}), ratio, multiple=8)
    assert plan.ratio <= ratio + 1e-12
    largest_step = max(8 * (s.in_features + s.out_features) for s in SHAPES.values())
    assert (ratio * plan.original_params - plan.total_kept_params) <= largest_step
    assert all(r is None or r % 8 == 0 for r in plan.ranks.values())


def test_greedy_spares_the_sensitive_projection():
    weights = {"a": 100.0, "b": 1.0, "c": 1.0}
    plan = greedy_plan(SHAPES, tail_cost(weights), 0.7, multiple=8)
    rank_a = plan.ranks["a"] or SHAPES["a"].max_rank
    even = greedy_plan(SHAPES, tail_cost({"a": 1.0, "b": 1.0, "c": 1.0}), 0.7, multiple=8)
    assert rank_a >= (even.ranks["a"] or SHAPES["a"].max_rank)
    assert plan.ratio <= 0.7


def test_greedy_rejects_impossible_ratio():
    with pytest.raises(ValueError, match="param_ratio"):
        greedy_plan(SHAPES, tail_cost({"a": 1, "b": 1, "c": 1}), 0.0)
    with pytest.raises(ValueError, match="param_ratio"):
        greedy_plan(SHAPES, tail_cost({"a": 1, "b": 1, "c": 1}), 1.2)


def test_ratio_one_keeps_everything_dense():
    plan = greedy_plan(SHAPES, tail_cost({"a": 1, "b": 1, "c": 1}), 1.0)
    assert plan.factored == {} and math.isclose(plan.ratio, 1.0)
