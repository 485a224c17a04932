"""Projection matching and grouping on the captured graph, for every family."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import asvd_passes as ap
from asvd_passes.graph import (
    InputStatistics,
    InsertObserversPass,
    RemoveObserversPass,
    capture,
    find_projections,
    group_by_input,
    output_projection_name,
)
from asvd_passes.graph.passes import OBSERVER_PREFIX

# Per family: the projection groups of one decoder layer (module-name suffixes after the layer prefix).
LAYER_PREFIX = {
    "llama": "model.layers.{i}.",
    "mistral": "model.layers.{i}.",
    "qwen2": "model.layers.{i}.",
    "qwen3": "model.layers.{i}.",
    "phi3": "model.layers.{i}.",
    "opt": "model.decoder.layers.{i}.",
    "gpt2": "transformer.h.{i}.",
    "llama3": "model.layers.{i}.",
    "olmo2": "model.layers.{i}.",
    "gemma2": "model.layers.{i}.",
    "gemma3": "model.layers.{i}.",
    "gpt_neox": "gpt_neox.layers.{i}.",
}
LLAMA_GROUPS = [
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
]
LAYER_GROUPS = {
    "llama": LLAMA_GROUPS,
    "mistral": LLAMA_GROUPS,
    "qwen2": LLAMA_GROUPS,
    "qwen3": LLAMA_GROUPS,
    "phi3": [("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)],
    "opt": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)],
    "gpt2": [("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)],
    "llama3": LLAMA_GROUPS,
    "olmo2": LLAMA_GROUPS,
    "gemma2": LLAMA_GROUPS,
    "gemma3": LLAMA_GROUPS,
    # Parallel attention and MLP, each after its own layer norm: two inputs.
    "gpt_neox": [("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)],
}
LAYERS = 2


def expected_groups(family: str) -> set[frozenset[str]]:
    groups = {
        frozenset(LAYER_PREFIX[family].format(i=i) + suffix for suffix in group)
        for i in range(LAYERS)
        for group in LAYER_GROUPS[family]
    }
    groups.add(frozenset({"lm_head"}))
    return groups


@pytest.fixture
def captured(family, tiny_model, tokens):
    model = tiny_model(family)
    graph_module = capture(model, tokens(1, 16))
    return model, graph_module, find_projections(graph_module, model)


def test_finds_exactly_the_linear_modules(family, captured, projections_of):
    model, _, projections = captured
    expected = projections_of(model)
    assert expected, "the tiny model should have Linear/Conv1D modules"
    assert len({p.name for p in projections}) == len(projections), "one entry per module"
    assert {p.name: (p.in_features, p.out_features) for p in projections} == expected
    # Every projection sits in a decoder layer, except the LM head.
    assert all(p.name == "lm_head" or p.name.startswith(LAYER_PREFIX[family].split("{")[0]) for p in projections)


def test_names_map_to_real_modules(family, captured):
    from transformers.pytorch_utils import Conv1D

    model, graph_module, projections = captured
    for p in projections:
        module = model.get_submodule(p.name)
        assert isinstance(module, (nn.Linear, Conv1D)), p.name
        assert p.transposed == isinstance(module, Conv1D), p.name
        assert p.node.graph is graph_module.graph
        weight = module.weight if not p.transposed else module.weight.t()
        assert tuple(weight.shape) == (p.out_features, p.in_features), p.name
        # The matched node reads the module's own weight (no copy).
        weight_nodes = [a for a in p.node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
        assert any(graph_module.get_parameter(a.target) is module.weight for a in weight_nodes), p.name
        # The recorded input carries the projection's channels in its last dimension.
        assert p.input_node.meta["val"].shape[-1] == p.in_features, p.name


def test_groups_share_one_input(family, captured):
    _, _, projections = captured
    groups = group_by_input(projections)
    assert {frozenset(g.names) for g in groups} == expected_groups(family)
    assert len({g.input_node for g in groups}) == len(groups)
    for group in groups:
        assert all(p.input_node is group.input_node for p in group.projections)
        assert all(p.in_features == group.in_features for p in group.projections)


def test_one_observer_per_distinct_input(family, captured, tokens):
    model, graph_module, projections = captured
    groups = group_by_input(projections)
    observe = InsertObserversPass(groups, ("abs_mean",))
    result = observe(graph_module)
    assert result.modified
    observer_nodes = [
        n for n in graph_module.graph.nodes if n.op == "call_module" and str(n.target).startswith(OBSERVER_PREFIX)
    ]
    assert len(observer_nodes) == len(groups)
    assert set(observe.observers) == {p.name for p in projections}
    distinct = {id(o) for o in observe.observers.values()}
    assert len(distinct) == len(groups)
    for group in groups:
        shared = {id(observe.observers[name]) for name in group.names}
        assert len(shared) == 1, group.names
        assert isinstance(observe.observers[group.names[0]], InputStatistics)
        assert observe.observers[group.names[0]].consumers == group.names
    RemoveObserversPass()(graph_module)
    assert not any(str(n.target).startswith(OBSERVER_PREFIX) for n in graph_module.graph.nodes)
    assert not any(name.startswith(OBSERVER_PREFIX) for name, _ in graph_module.named_children())


def test_output_projection_name(family, tiny_model):
    assert output_projection_name(tiny_model(family)) == "lm_head"


def test_lm_head_excluded_by_default(family, tiny_model, tokens, projections_of):
    model = tiny_model(family)
    names = set(projections_of(model))
    report = ap.ASVDCompressor(model).compress(
        ap.ASVDConfig(method="svd", allocation="uniform", param_ratio=0.5), calibration=tokens(1, 16), progress=False
    )
    assert "lm_head" not in report.ranks
    assert set(report.ranks) == names - {"lm_head"}
    assert isinstance(model.lm_head, nn.Linear)


def test_lm_head_included_when_asked(family, tiny_model, tokens, projections_of):
    model = tiny_model(family)
    names = set(projections_of(model))
    ids = tokens(2, 16)
    report = ap.ASVDCompressor(model).compress(
        ap.ASVDConfig(method="svd", allocation="uniform", param_ratio=0.5, include_lm_head=True), calibration=ids, progress=False
    )
    assert set(report.ranks) == names
    assert report.ranks["lm_head"] is not None
    assert isinstance(model.lm_head, ap.LowRankLinear)
    assert model.lm_head.rank == report.ranks["lm_head"]
    # The input embedding is untouched and the model still runs.
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 16, model.config.vocab_size) and torch.isfinite(logits).all()

