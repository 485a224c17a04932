"""``--graph builder``: onnxruntime-genai's model builder's decoder graph carrying the grids ``asvd quantize``
recorded (GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits from our codes)."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch

from asvd_passes.cli import main
from asvd_passes.errors import InvalidInputError

pytest.importorskip("onnxruntime_genai")
pytestmark = pytest.mark.xdist_group("genai-builder")  # one worker: the builder's imports cost seconds once

MIB = 2**20


@pytest.fixture(scope="module")
def quantized_folder(tmp_path_factory):
    """A tiny tied Llama (GQA; head size 16, as GroupQueryAttention's CPU kernel wants) on a mixed byte-budget
    plan (2/4/8 bits, block offsets), saved as ``asvd quantize`` saves it, with a word-level tokenizer."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config, token_batch, word_tokenizer
    from asvd_passes.quantization.calibrate import quantize_model, save_quantized
    from asvd_passes.quantization.plan import GridChoice, budget_plan, candidates_for, fixed_bytes, grid_bytes, planned_shapes, reserved_bytes

    config = tiny_config("llama")
    config.hidden_size, config.head_dim = 64, 16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    shapes = planned_shapes(model, "lm_head")
    low = sum(min(grid_bytes(s, c) for c in candidates_for(n, "lm_head", s)) for n, s in shapes.items())
    uniform = sum(grid_bytes(s, GridChoice(4, 32)) for s in shapes.values())  # int4/32 everywhere
    budget = reserved_bytes(shapes, fixed_bytes(model, "lm_head")) + (low + uniform) // 2  # some matrices below it
    windows = token_batch(4, 16, seed=9)
    plan, _ = budget_plan(model, windows, budget / MIB, "lm_head", progress=False)
    # Block offsets on one matrix the builder packs (q/k/v) and one it does not, whatever the plan chose.
    plan["model.layers.0.self_attn.k_proj"] = plan["model.layers.1.mlp.up_proj"] = GridChoice(4, 32, True)
    # Layer 1's q/k/v on one grid: packed again into one MatMulNBits (layer 0's stay three: k has offsets).
    for role in "qkv":
        plan[f"model.layers.1.self_attn.{role}_proj"] = GridChoice(4, 32)
    grids = quantize_model(model, windows, choices=plan, progress=False)
    root = tmp_path_factory.mktemp("builder-graph")
    save_quantized(model, word_tokenizer()[0], grids, root / "q")
    return model, grids, root


def test_builder_graph_holds_fused_ops_and_our_codes(quantized_folder, tokens):
    """The builder's fused decoder, every recorded grid as MatMulNBits (q/k/v, which the builder packs, split
    per matrix and packed again where they share a grid), no float weight left; with MatMulNBits set to float compute, ORT's logits are PyTorch's, and
    stepping the cache (ORT and onnxruntime-genai) gives PyTorch's greedy tokens."""
    import onnx

    from conftest import assert_ort_computes_the_grid
    from exporters import GenAICausalLM, ORTCausalLM
    from exporters.onnx_export import METADATA_FILE, MODEL_FILE

    model, grids, root = quantized_folder
    assert main(["export", "onnx", str(root / "q"), "--out", str(root / "onnx"), "--weights", "int4",
                 "--graph", "builder"]) == 0
    metadata = json.loads((root / "onnx" / METADATA_FILE).read_text())
    assert metadata["graph"] == "builder" and metadata["quantized"]["from_recorded_grids"] == len(grids)
    assert metadata["quantized"]["packed_matmuls_split"] == model.config.num_hidden_layers  # one qkv per layer
    assert len({(q.bits, q.block_size, q.offsets is not None) for q in grids.values()}) > 1  # mixed grids
    assert grids["model.layers.0.self_attn.k_proj"].offsets is not None
    graph = onnx.load(str(root / "onnx" / MODEL_FILE)).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    layers = model.config.num_hidden_layers
    assert ops["GroupQueryAttention"] == layers and ops["SkipSimplifiedLayerNormalization"] >= 2 * layers - 1
    assert metadata["quantized"]["split_matmuls_merged_again"] == 1 and ops["Concat"] == 1  # layer 1's, layer 0's
    assert ops["MatMulNBits"] == len(grids) - 2 and ops["GatherBlockQuantized"] == 1  # the tied embedding
    initializers = {init.name for init in graph.initializer}
    float_weights = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in initializers
                     and not n.input[1].endswith(("_block_offsets", "_block_indicator"))]
    assert not float_weights
    assert (root / "onnx" / "genai_config.json").is_file() and (root / "onnx" / "tokenizer.json").is_file()
    # A byte budget planned for our graph holds in this one: the builder's rotary tables are computed in the
    # graph (Range, Mul, Cos/Sin), not stored.
    from asvd_passes.quantization.plan import GRAPH_RESERVE, GridChoice, fixed_bytes, indicator_bytes, planned_shapes

    assert metadata["quantized"]["rotary_table_bytes_computed"] == 2 * 128 * 8 * 4  # 2 tables, 128 positions × 8
    assert ops["Cos"] == ops["Sin"] == 1 and not {"cos_cache", "sin_cache"} & {i.name for i in graph.initializer}
    shapes = planned_shapes(model, "lm_head")
    chosen = {n: GridChoice(q.bits, q.block_size, q.offsets is not None) for n, q in grids.items()}
    predicted = sum(q.nbytes() for q in grids.values()) + indicator_bytes(shapes, chosen) + fixed_bytes(model, "lm_head")
    assert (root / "onnx" / MODEL_FILE).stat().st_size <= predicted + GRAPH_RESERVE

    ids = tokens(2, 12, seed=4)
    assert_ort_computes_the_grid(model, root / "onnx", ids)  # float compute from here on
    prompt = tokens(1, 5, seed=2)
    with torch.no_grad():
        greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                                pad_token_id=0).numpy()
    assert np.array_equal(ORTCausalLM(root / "onnx").generate(prompt.numpy(), max_new_tokens=16), greedy)
    assert np.array_equal(GenAICausalLM(root / "onnx").generate(prompt.numpy(), max_new_tokens=16), greedy)


def test_builder_graph_refuses_what_it_cannot_carry(quantized_folder, tmp_path, tiny_model):
    """Before any work: no recorded grids, a format the grids are not, a model object, a low-rank model; and after
    the build, a model whose builder graph does not compute what transformers computes (found on a tiny Llama
    whose MLP is twice its width: the builder's fp32 graph is off by a third of the logits' scale)."""
    from exporters import export_onnx

    from asvd_passes import ASVDCompressor, ASVDConfig
    from conftest import token_batch, word_tokenizer

    model, _, root = quantized_folder
    with pytest.raises(InvalidInputError, match="asvd quantize"):
        export_onnx(str(root / "q"), tmp_path / "a", weights="fp32", graph="builder")
    with pytest.raises(InvalidInputError, match="8-bit|does not describe"):
        export_onnx(str(root / "q"), tmp_path / "b", weights="int8", graph="builder")
    with pytest.raises(InvalidInputError, match="folder"):
        export_onnx(model, tmp_path / "c", weights="int4", graph="builder")
    compressor = ASVDCompressor(tiny_model("llama"))
    compressor.compress(ASVDConfig(param_ratio=0.8), calibration=token_batch(4, 16), save_dir=tmp_path / "lowrank",
                        progress=False)
    word_tokenizer()[0].save_pretrained(tmp_path / "lowrank")
    with pytest.raises(InvalidInputError, match="asvd quantize|low-rank"):
        export_onnx(str(tmp_path / "lowrank"), tmp_path / "d", weights="int4", graph="builder")
    assert not any((tmp_path / name).exists() for name in "abcd")

    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from asvd_passes.quantization.calibrate import quantize_model, save_quantized

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    torch.manual_seed(0)
    wide = AutoModelForCausalLM.from_config(config).eval()
    save_quantized(wide, word_tokenizer()[0], quantize_model(wide, token_batch(4, 16), progress=False), tmp_path / "wide")
    with pytest.raises(InvalidInputError, match="does not compute what transformers computes"):
        export_onnx(str(tmp_path / "wide"), tmp_path / "e", weights="int4", graph="builder")
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob("*asvd-builder*"))
