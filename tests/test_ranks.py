"""Rank plans: the uniform-ratio formula, explicit maps, exact accounting, seeded determinism."""

from __future__ import annotations

import math

import pytest
import torch

import asvd_passes as ap
from asvd_passes.ranks import ProjectionShape, RankPlan, explicit_plan, uniform_ratio_plan

from conftest import FAMILIES

# (out_features, in_features)
SHAPES = {
    "square": ProjectionShape(32, 32),
    "wide": ProjectionShape(64, 32),
    "tall": ProjectionShape(32, 64),
    "fused": ProjectionShape(96, 32),
    "head": ProjectionShape(128, 32),
    "odd": ProjectionShape(50, 7),
}


def expected_rank(shape: ProjectionShape, ratio: float) -> int | None:
    rank = max(1, math.floor(ratio * shape.in_features * shape.out_features / (shape.in_features + shape.out_features)))
    return rank if rank * (shape.in_features + shape.out_features) < shape.in_features * shape.out_features else None


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
def test_uniform_ratio_formula(ratio):
    plan = uniform_ratio_plan(SHAPES, ratio)
    assert plan.ranks == {name: expected_rank(shape, ratio) for name, shape in SHAPES.items()}
    assert plan.ratio <= ratio
    assert plan.factored == {n: r for n, r in plan.ranks.items() if r is not None}


def test_uniform_ratio_hand_values():
    plan = uniform_ratio_plan(SHAPES, 0.5)
    # floor(0.5·32·32/64) = 8; floor(0.5·64·32/96) = 10; floor(0.5·96·32/128) = 12; floor(0.5·128·32/160) = 12
    assert plan.ranks["square"] == 8
    assert plan.ranks["wide"] == plan.ranks["tall"] == 10
    assert plan.ranks["fused"] == 12
    assert plan.ranks["head"] == 12
    assert plan.ranks["odd"] == 3  # floor(0.5·350/57) = 3: 3·57 = 171 < 350
    assert plan.total_kept_params == 8 * 64 + 2 * 10 * 96 + 12 * 128 + 12 * 160 + 3 * 57
    assert plan.original_params == 1024 + 2 * 2048 + 3072 + 4096 + 350
    assert plan.ratio == plan.total_kept_params / plan.original_params


def test_layer_that_would_not_save_stays_dense():
    shapes = {"thin": ProjectionShape(4, 1), "tiny": ProjectionShape(2, 2), "ok": ProjectionShape(64, 32)}
    plan = uniform_ratio_plan(shapes, 0.9)
    assert plan.ranks["thin"] is None  # rank 1 costs 5 > 4 weights
    assert plan.ranks["tiny"] is None  # floor(0.9) = 0 → rank 1 costs 4 = 4 weights: no saving
    assert plan.ranks["ok"] == 19
    assert plan.kept_params("thin") == 4 and plan.kept_params("tiny") == 4


def test_ratio_one_keeps_everything_dense():
    plan = uniform_ratio_plan(SHAPES, 1.0)
    assert all(rank is None for rank in plan.ranks.values())
    assert plan.factored == {} and plan.ratio == 1.0


def test_ratio_one_leaves_model_unchanged(tiny_model, tokens):
    model = tiny_model("llama")
    ids = tokens(2, 16)
    with torch.no_grad():
        before = model(ids).logits
    report = ap.ASVDCompressor(model).compress(
        ap.ASVDConfig(method="svd", allocation="uniform", param_ratio=1.0), calibration=ids, progress=False
    )
    assert report.ranks and all(rank is None for rank in report.ranks.values())
    assert report.selected_ratio == 1.0 and report.model_ratio == 1.0
    assert not any(isinstance(m, ap.LowRankLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, 1.0000001, float("nan")])
def test_ratio_outside_unit_interval_raises(ratio):
    with pytest.raises(ValueError, match="param_ratio must lie in"):
        uniform_ratio_plan(SHAPES, ratio)
    with pytest.raises(ValueError, match="param_ratio must lie in"):
        ap.ASVDConfig(param_ratio=ratio)


def test_explicit_plan():
    plan = explicit_plan(SHAPES, {"wide": 5, "square": 32})
    assert plan.ranks == {"square": 32, "wide": 5, "tall": None, "fused": None, "head": None, "odd": None}
    assert plan.kept_params("square") == 32 * 64  # full rank is allowed (and costs more than dense)
    assert plan.kept_params("tall") == 2048

    base = uniform_ratio_plan(SHAPES, 0.5)
    overlay = explicit_plan(SHAPES, {"head": 2}, base)
    assert overlay.ranks == {**base.ranks, "head": 2}
    assert base.ranks["head"] == 12, "the base plan is not modified"


@pytest.mark.parametrize(
    "ranks, message",
    [
        ({"nope": 4}, "not selected projections"),
        ({"wide": 0}, r"outside \[1, 32\]"),
        ({"wide": 33}, r"outside \[1, 32\]"),
        ({"odd": 8}, r"outside \[1, 7\]"),
    ],
)
def test_explicit_plan_validation(ranks, message):
    with pytest.raises(ValueError, match=message):
        explicit_plan(SHAPES, ranks)


@pytest.mark.parametrize("ranks", [{"a": 0}, {"a": -3}, {"a": 2.5}, {"a": "4"}])
def test_config_rejects_bad_ranks(ranks):
    with pytest.raises(ValueError, match="positive integer"):
        ap.ASVDConfig(param_ratio=None, ranks=ranks)


def test_ranks_for_unselected_module_rejected(tiny_model, tokens):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="not selected projections"):
        ap.ASVDCompressor(model).compress(
            ap.ASVDConfig(method="svd", allocation="uniform", param_ratio=None, ranks={"lm_head": 4}), calibration=tokens(1, 8), progress=False
        )
    assert not any(isinstance(m, ap.LowRankLinear) for m in model.modules())


def _stored_params(in_features: int, out_features: int, rank: int | None, interpolative: bool) -> int:
    """What a projection keeps: dense, two factors, or r rows plus (out − r) × r coefficients."""
    if rank is None:
        return in_features * out_features
    if interpolative and rank < out_features:
        return rank * in_features + (out_features - rank) * rank
    return rank * (in_features + out_features)


# Every family once (its biases, fused and Conv1D projections, tied head), every (ratio, form) pair on three of them.
RATIO_FORMS = [(0.3, "interpolative"), (0.3, "pair"), (0.7, "interpolative"), (0.7, "pair")]


@pytest.mark.parametrize("family, ratio, form", [(f, *RATIO_FORMS[i % 4]) for i, f in enumerate(FAMILIES)])
def test_report_ratio_is_exact(family, ratio, form, tiny_model, tokens, projections_of):
    model = tiny_model(family)
    shapes = projections_of(model)  # {name: (in, out)}, before compression
    params_before = sum(p.numel() for p in model.parameters())
    report = ap.ASVDCompressor(model).compress(
        ap.ASVDConfig(method="svd", allocation="uniform", param_ratio=ratio, ranks={next(iter(shapes)): 3},
                      lowrank_form=form), calibration=tokens(1, 8), progress=False
    )
    interpolative = form == "interpolative"
    assert report.lowrank_form == form
    assert set(report.ranks) == set(shapes) - {"lm_head"}
    assert report.ranks[next(iter(shapes))] == 3
    before = sum(shapes[name][0] * shapes[name][1] for name in report.ranks)
    after = sum(_stored_params(*shapes[name], rank, interpolative) for name, rank in report.ranks.items())
    assert report.selected_params_before == before
    assert report.selected_params_after == after
    assert report.selected_ratio == after / before
    # The live model agrees: its parameter count shrank by exactly the saved weights (biases are kept).
    params_after = sum(p.numel() for p in model.parameters())
    assert report.model_params_before == params_before
    assert report.model_params_after == params_after == params_before - (before - after)
    assert report.model_ratio == params_after / params_before
    for name, rank in report.ranks.items():
        module = model.get_submodule(name)
        assert isinstance(module, ap.LowRankLinear) == (rank is not None)
        if rank is not None:
            assert module.down.weight.shape == (rank, shapes[name][0])
            kept_rows = shapes[name][1] - rank if module.interpolative else shapes[name][1]
            assert module.interpolative == (interpolative and rank < shapes[name][1])
            assert module.up.weight.shape == (kept_rows, rank)


def _factors(model):
    return {
        f"{name}.{part}": getattr(module, part).weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, ap.LowRankLinear)
        for part in ("down", "up")
    }


@pytest.mark.parametrize("family, method", [("qwen2", "whiten"), ("gpt2", "asvd"), ("opt", "whiten")])
def test_seeded_runs_are_bit_identical(family, method, tiny_model, tokens):
    runs = []
    for _ in range(2):
        model = tiny_model(family, seed=7)
        config = ap.ASVDConfig(method=method, allocation="uniform", param_ratio=0.6, seed=3)
        ap.ASVDCompressor(model).compress(config, calibration=tokens(4, 32, seed=3), progress=False)
        runs.append(_factors(model))
    assert runs[0] and runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_svd_without_calibration_is_seeded(tiny_model):
    """Plain SVD traces on seeded random ids; the factors depend on the weights only."""
    runs = []
    for _ in range(2):
        model = tiny_model("mistral", seed=11)
        ap.ASVDCompressor(model).compress(ap.ASVDConfig(method="svd", allocation="uniform", param_ratio=0.5, seqlen=8), progress=False)
        runs.append(_factors(model))
    assert runs[0] and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
