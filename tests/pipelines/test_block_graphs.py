"""One block capture per distinct block structure, rebound to every block's own tensors."""

from __future__ import annotations

import torch
from torch import nn

from asvd_passes import ASVDCompressor, ASVDConfig
from asvd_passes.allocation.block_cache import decoder_layers
from asvd_passes.graph import LowRankRewritePass, find_projections
from asvd_passes.modules import LowRankLinear, projection_weight
from asvd_passes.pipelines import block_graphs
from asvd_passes.pipelines.block_graphs import BlockGraphs
from asvd_passes.pipelines.blocks import BlockCall, record_block_inputs, run_block


def _structures(model) -> int:
    """Distinct block structures of the tiny models: Gemma 2/3 alternate sliding and full layers."""
    return len(set(getattr(model.config, "layer_types", None) or ["all alike"]))


def test_each_block_runs_its_own_weights_through_a_shared_capture(family, tiny_model, tokens):
    model = tiny_model(family)
    hidden, calls = record_block_inputs(model, tokens(2, 16), "cpu")
    graphs = BlockGraphs()
    layers = decoder_layers(model)
    with torch.no_grad():
        for index, layer in enumerate(layers):
            graph = graphs.capture(layer, hidden[0], calls[index])
            torch.testing.assert_close(graph(hidden[1], *calls[index].args, **calls[index].kwargs),
                                       run_block(layer, hidden[1], calls[index]), rtol=0, atol=1e-6)
    assert graphs.captures == _structures(model)


def test_rewriting_one_blocks_graph_leaves_the_next_blocks_dense(tiny_model, tokens):
    model = tiny_model("llama")
    hidden, calls = record_block_inputs(model, tokens(2, 16), "cpu")
    first, second = decoder_layers(model)
    graphs = BlockGraphs()
    graph = graphs.capture(first, hidden[0], calls[0])
    projections = find_projections(graph, first)
    replacements = {}
    for p in projections:
        weight = projection_weight(first.get_submodule(p.name))
        replacements[p.name] = LowRankLinear.from_factors(torch.zeros(1, weight.shape[1]), torch.zeros(weight.shape[0], 1),
                                                          None, torch.float32, "cpu")
    LowRankRewritePass(projections, replacements)(graph)
    with torch.no_grad():
        rewritten = graph(hidden[0], *calls[0].args, **calls[0].kwargs)
        assert (rewritten - run_block(first, hidden[0], calls[0])).abs().max() > 1e-3
        again = graphs.capture(second, hidden[0], calls[1])
        torch.testing.assert_close(again(hidden[0], *calls[1].args, **calls[1].kwargs),
                                   run_block(second, hidden[0], calls[1]), rtol=0, atol=1e-6)
    assert graphs.captures == 1


class _IndexScaledBlock(nn.Module):
    """Reads its layer index in forward (transformers' name for it): the same structure computes differently."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.proj = nn.Linear(8, 8)

    def forward(self, hidden):
        return self.proj(hidden) * (self.layer_idx + 1)


def test_a_block_whose_graph_disagrees_is_captured_on_its_own():
    torch.manual_seed(0)
    blocks = [_IndexScaledBlock(0), _IndexScaledBlock(1)]
    x = torch.randn(1, 4, 8)
    graphs = BlockGraphs()
    with torch.no_grad():
        for block in blocks:
            torch.testing.assert_close(graphs.capture(block, x, BlockCall())(x), block(x), rtol=0, atol=0)
    assert graphs.captures == 2


def test_sequential_pipeline_captures_each_structure_once(family, tiny_model, tokens, monkeypatch):
    captured = []
    capture = block_graphs.capture_block
    monkeypatch.setattr(block_graphs, "capture_block", lambda *args: captured.append(args[0]) or capture(*args))
    model = tiny_model(family)
    ASVDCompressor(model).compress(ASVDConfig(param_ratio=0.8, pipeline="sequential", seqlen=16, calib_samples=4),
                                   calibration=tokens(4, 16), progress=False)
    # The survey and both passes (fisher allocation) over every block: one capture per structure in all.
    assert len(captured) == _structures(model)


def test_kept_graphs_do_not_hold_a_released_blocks_tensors(tiny_model, tokens):
    """Offloaded runs swap a block's tensors out after use; the kept template must not pin the old ones."""
    import gc
    import weakref

    model = tiny_model("llama")
    hidden, calls = record_block_inputs(model, tokens(2, 16), "cpu")
    block = decoder_layers(model)[0]
    graphs = BlockGraphs()
    graphs.capture(block, hidden[0], calls[0])
    released = weakref.ref(block.self_attn.q_proj.weight)
    block.self_attn.q_proj.weight = nn.Parameter(block.self_attn.q_proj.weight.detach().clone())
    gc.collect()
    assert released() is None
    again = graphs.capture(block, hidden[0], calls[0])
    with torch.no_grad():
        torch.testing.assert_close(again(hidden[1], *calls[0].args, **calls[0].kwargs),
                                   run_block(block, hidden[1], calls[0]), rtol=0, atol=1e-6)
