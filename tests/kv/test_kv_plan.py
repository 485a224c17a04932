"""KV rank plans: exact widths, budgets met within one step, K and V priced apart, head geometry."""

from __future__ import annotations

import pytest
import torch

from asvd_passes.kv import find_attention_layers, greedy_kv_plan, resolve_group_size, uniform_kv_plan
from asvd_passes.kv.layout import AttentionLayout


def layouts(n=4, kv_heads=2, head_dim=16, hidden=64):
    return [AttentionLayout(f"layers.{i}.attn", i, 4, kv_heads, head_dim, hidden, None, "o_proj") for i in range(n)]


def test_layouts_of_every_family(family, tiny_model):
    model = tiny_model(family)
    found = find_attention_layers(model)
    assert [l.layer_idx for l in found] == [0, 1]
    layout = found[0]
    source = model.get_submodule(layout.source("key"))
    assert layout.kv_width == (4 if family in ("opt", "gpt2", "gpt_neox") else 2) * layout.head_dim
    if family in ("gemma2", "gemma3"):
        assert layout.head_dim == 16 != model.config.hidden_size // layout.heads
    if layout.interleaved:  # GPT-NeoX: per head [q_h | k_h | v_h]
        d = layout.head_dim
        assert layout.rows("key")[:d].tolist() == list(range(d, 2 * d))
        assert layout.rows("value")[d:2 * d].tolist() == list(range(5 * d, 6 * d))
        assert sorted(torch.cat([layout.rows(r) for r in ("query", "key", "value")]).tolist()) == list(range(3 * layout.q_width))
    elif layout.fused:  # K and V rows sit after the query rows of the fused projection
        assert layout.rows("key").start == layout.q_width and layout.rows("value").stop == layout.q_width + 2 * layout.kv_width
    else:
        assert layout.source("value").endswith("v_proj") and source is model.get_submodule(f"{layout.name}.k_proj")


def test_uniform_plan_is_exact():
    plan = uniform_kv_plan(layouts(), 0.5, group_size=1)
    assert plan.ranks["layers.0.attn"] == {"key": [8, 8], "value": [8, 8]}
    assert plan.ratio == 0.5 and plan.role_ratio("key") == 0.5
    shared = uniform_kv_plan(layouts(), 0.3, group_size=2)
    assert shared.ranks["layers.3.attn"]["value"] == [9]  # floor(0.3 · 32)
    assert shared.total_latent_width == 4 * 2 * 9


def test_greedy_meets_budget_within_one_step_and_prices_roles_apart():
    # Keys cheap to cut, values expensive: the budget should come out of K first.
    costs = {}
    for layout in layouts():
        for g in range(2):
            costs[(layout.name, "key", g)] = [0.01 * (16 - r) for r in range(17)]
            costs[(layout.name, "value", g)] = [1.0 * (16 - r) ** 2 for r in range(17)]
    for ratio in (0.9, 0.5, 0.3):
        for multiple in (1, 4):
            plan = greedy_kv_plan(layouts(), costs, ratio, group_size=1, multiple=multiple)
            budget = ratio * plan.dense_width
            assert plan.total_latent_width <= budget
            assert budget - plan.total_latent_width < multiple  # one step of one group
    plan = greedy_kv_plan(layouts(), costs, 0.5, group_size=1)
    assert plan.role_ratio("key") < plan.role_ratio("value")


def test_group_size_resolution():
    assert resolve_group_size(layouts(kv_heads=3), None) == 3
    assert resolve_group_size(layouts(kv_heads=4), 2) == 2
    with pytest.raises(ValueError, match="must divide"):
        resolve_group_size(layouts(kv_heads=3), 2)
    with pytest.raises(ValueError, match=r"kv_ratio must lie in \(0, 1\]"):
        uniform_kv_plan(layouts(), 0.0, 1)


def test_greedy_plan_cuts_the_cheap_role_of_each_layer_and_meets_the_budget():
    found = layouts(n=3)
    # K cheap to cut in layer 0, V cheap in layer 2: the plan cuts those deepest.
    costs = {}
    for i, layout in enumerate(found):
        for role in ("key", "value"):
            slope = 0.1 if (i, role) in ((0, "key"), (2, "value")) else 1.0
            costs[(layout.name, role, 0)] = [slope * (32 - r) ** 2 for r in range(33)]
    plan = greedy_kv_plan(found, costs, 0.5, group_size=2)
    assert plan.ranks[found[0].name]["key"][0] < plan.ranks[found[0].name]["value"][0]
    assert plan.ranks[found[2].name]["value"][0] < plan.ranks[found[2].name]["key"][0]
    assert 0.5 * plan.dense_width - 1 <= plan.total_latent_width <= 0.5 * plan.dense_width
