"""Observer statistics against a hand computation from forward hooks on the real modules."""

from __future__ import annotations

import re

import pytest
import torch

import asvd_passes as ap
from asvd_passes.graph import (
    InputStatistics,
    InsertObserversPass,
    NonFiniteActivationError,
    RemoveObserversPass,
    capture,
    find_projections,
    group_by_input,
)

ALL_STATISTICS = ("abs_mean", "abs_max", "gram")
SAMPLES, SEQLEN = 3, 12


def _hooked_inputs(model, names, rows):
    """Inputs each named module receives in eager mode, flattened to (tokens, in) float64."""
    seen = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        )
        for name in names
    ]
    try:
        with torch.no_grad():
            for row in rows:
                model(input_ids=row[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks) for name, chunks in seen.items()}


def _observe(model, rows, statistics=ALL_STATISTICS):
    graph_module = capture(model, rows[:1])
    projections = find_projections(graph_module, model)
    groups = group_by_input(projections)
    observe = InsertObserversPass(groups, statistics)
    graph_module = observe(graph_module).graph_module
    return graph_module, projections, groups, observe


def test_statistics_match_hand_computation(family, tiny_model, tokens):
    model = tiny_model(family)
    rows = tokens(SAMPLES, SEQLEN)
    graph_module, projections, groups, observe = _observe(model, rows)
    with torch.no_grad():
        for row in rows:
            graph_module(input_ids=row[None], use_cache=False)

    inputs = _hooked_inputs(model, [p.name for p in projections], rows)
    for group in groups:
        first = inputs[group.names[0]]
        assert first.shape == (SAMPLES * SEQLEN, group.in_features)
        for name in group.names[1:]:  # the group really does share one input tensor
            torch.testing.assert_close(inputs[name], first, rtol=0, atol=0)
        stats = observe.observers[group.names[0]]
        assert stats.count == SAMPLES * SEQLEN, group.names
        torch.testing.assert_close(stats.abs_mean(), first.abs().mean(0), rtol=1e-5, atol=1e-7, msg=str(group.names))
        torch.testing.assert_close(
            stats.abs_max.double(), first.abs().amax(0), rtol=1e-5, atol=1e-7, msg=str(group.names)
        )
        assert stats.gram.dtype == torch.float64
        gram = first.T @ first
        torch.testing.assert_close(stats.gram, gram, rtol=1e-5, atol=1e-6 * gram.abs().max().item())


def test_requested_statistics_only(tiny_model, tokens):
    model = tiny_model("llama")
    rows = tokens(2, 8)
    graph_module, _, groups, observe = _observe(model, rows, ("abs_mean",))
    with torch.no_grad():
        graph_module(input_ids=rows[:1], use_cache=False)
    stats = observe.observers[groups[0].names[0]]
    assert stats.gram is None
    assert stats.count == 8
    with pytest.raises(ValueError, match="Unknown statistics"):
        InputStatistics(4, ("nope",), ("x",))
    with pytest.raises(ValueError, match="No calibration data"):
        InputStatistics(4, ("abs_mean",), ("x",)).abs_mean()


def test_observed_output_equals_unobserved(family, tiny_model, tokens):
    model = tiny_model(family)
    rows = tokens(2, SEQLEN)
    graph_module = capture(model, rows[:1])
    with torch.no_grad():
        plain = [graph_module(input_ids=row[None], use_cache=False).logits for row in rows]
        eager = [model(input_ids=row[None], use_cache=False).logits for row in rows]
    groups = group_by_input(find_projections(graph_module, model))
    graph_module = InsertObserversPass(groups, ALL_STATISTICS)(graph_module).graph_module
    with torch.no_grad():
        observed = [graph_module(input_ids=row[None], use_cache=False).logits for row in rows]
    for a, b, c in zip(plain, observed, eager):
        assert torch.equal(a, b)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)
    graph_module = RemoveObserversPass()(graph_module).graph_module
    with torch.no_grad():
        assert torch.equal(graph_module(input_ids=rows[:1], use_cache=False).logits, plain[0])


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "phi3"])
def test_nan_activation_names_the_projection(family, tiny_model, tokens):
    model = tiny_model(family)
    rows = tokens(2, SEQLEN)
    poisoned = int(rows[0, 3])
    with torch.no_grad():
        model.get_input_embeddings().weight[poisoned, 0] = float("nan")
    graph_module, projections, groups, _ = _observe(model, rows)
    first = groups[0].names[0]  # the first projections to read the embedding stream
    with pytest.raises(NonFiniteActivationError, match=re.escape(first)):
        with torch.no_grad():
            graph_module(input_ids=rows[:1], use_cache=False)


def test_nan_activation_stops_compression(tiny_model, tokens):
    model = tiny_model("qwen2")
    rows = tokens(2, SEQLEN)
    with torch.no_grad():
        model.get_input_embeddings().weight[int(rows[1, 5])] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        ap.ASVDCompressor(model).compress(ap.ASVDConfig(method="asvd", allocation="uniform", param_ratio=0.5), calibration=rows, progress=False)
    assert not any(isinstance(m, ap.LowRankLinear) for m in model.modules()), "the model must be left untouched"


def test_gram_sums_single_precision_chunks_in_double_precision():
    """On the CPU, XᵀX comes from float32 products over chunks of tokens (the last one partial), summed in float64."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 650, 24, generator=generator) + 3.0  # 1300 tokens: chunks of 512, 512 and 276
    stats = InputStatistics(24, ("gram",), ("proj",))
    stats(x)
    wide = x.reshape(-1, 24).double()
    expected = wide.T @ wide
    assert stats.gram.dtype == torch.float64 and stats.count == 1300
    torch.testing.assert_close(stats.gram, expected, rtol=1e-6, atol=0)
    assert not torch.allclose(stats.gram, expected - wide[-1:].T @ wide[-1:], rtol=1e-6, atol=0)  # every token counts
