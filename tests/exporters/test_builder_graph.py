"""``--graph builder``: onnxruntime-genai's model builder's decoder graph (GroupQueryAttention,
SkipSimplifiedLayerNormalization) carrying our weights: dense or low-rank in float, and the grids ``asvd quantize``
recorded as MatMulNBits from our codes."""

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
    from conftest import token_batch, word_tokenizer
    from asvd_passes.quantization.calibrate import quantize_model, save_quantized
    from asvd_passes.quantization.plan import GridChoice, budget_plan, candidates_for, fixed_bytes, grid_bytes, planned_shapes, reserved_bytes

    model = builder_llama()
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


def builder_llama():
    """A tiny tied Llama (GQA) with head size 16, as GroupQueryAttention's CPU kernel wants."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config("llama")
    config.hidden_size, config.head_dim = 64, 16
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def low_rank_folders(tmp_path_factory):
    """The tiny Llama compressed at parameter ratio 0.8 in both low-rank forms, saved as ``asvd compress`` saves it,
    and the pair form quantized by GPTQ (int4/32, the factors on their own grids) as ``asvd quantize`` saves it."""
    from asvd_passes import ASVDCompressor, ASVDConfig
    from asvd_passes.models import load_model_and_tokenizer
    from asvd_passes.quantization.calibrate import quantize_model, save_quantized
    from conftest import token_batch, word_tokenizer

    root = tmp_path_factory.mktemp("builder-graph-low-rank")
    for form in ("pair", "interpolative"):
        ASVDCompressor(builder_llama()).compress(ASVDConfig(param_ratio=0.8, lowrank_form=form),
                                                calibration=token_batch(4, 16), save_dir=root / form, progress=False)
        word_tokenizer()[0].save_pretrained(root / form)
    model, tokenizer = load_model_and_tokenizer(str(root / "pair"))
    save_quantized(model, tokenizer, quantize_model(model, token_batch(4, 16, seed=9), progress=False), root / "int4")
    return root


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


@pytest.mark.parametrize("form", ["dense", "pair", "interpolative"])
def test_builder_graph_of_float_models(form, quantized_folder, low_rank_folders, tokens):
    """A float folder, dense or low-rank in either form, in the builder's fused graph: each low-rank projection is
    its two MatMuls (q/k/v, which the builder packs, split where one of them is low-rank; the interpolative form
    puts its rows back in order with a Concat and a Gather), ORT's logits are PyTorch's within 1e-4 of their scale,
    and ORT's and onnxruntime-genai's greedy tokens are PyTorch's."""
    import onnx

    from asvd_passes.models import load_model_and_tokenizer
    from asvd_passes.modules import LowRankLinear
    from exporters import GenAICausalLM, ORTCausalLM
    from exporters.onnx_export import METADATA_FILE, MODEL_FILE

    folder = quantized_folder[2] / "q" if form == "dense" else low_rank_folders / form
    out = folder.parent / f"{form}-fp32-onnx"
    assert main(["export", "onnx", str(folder), "--out", str(out), "--graph", "builder"]) == 0
    model, _ = load_model_and_tokenizer(str(folder))
    factored = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert (form == "dense") == (not factored)
    assert not any(m.interpolative for m in factored.values()) or form == "interpolative"
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["graph"] == "builder" and metadata["weights"] == "fp32"
    assert metadata["quantized"]["low_rank_projections"] == len(factored)
    assert metadata["weight_ranks"] == {n: m.rank for n, m in factored.items()}
    graph = onnx.load(str(out / MODEL_FILE)).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    layers = model.config.num_hidden_layers
    assert ops["GroupQueryAttention"] == layers and ops["MatMulNBits"] == 0
    dense = sum(type(m) is torch.nn.Linear for n, m in model.named_modules() if not n.endswith((".down", ".up")))
    packed_kept = layers - metadata["quantized"]["packed_matmuls_split"]  # q/k/v as one MatMul
    assert ops["MatMul"] == dense - 2 * packed_kept + 2 * len(factored)
    interpolative = sum(m.interpolative for m in factored.values())
    assert ops["Gather"] == 2 + interpolative  # the embedding, a shape, and each interpolative projection's row order
    assert not {"cos_cache", "sin_cache"} & {i.name for i in graph.initializer}

    ids = tokens(2, 12, seed=4)
    with torch.no_grad():
        expected = model(ids).logits.numpy()
    got = ORTCausalLM(out, threads=1).logits(ids.numpy())
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    prompt = tokens(1, 5, seed=2)
    with torch.no_grad():
        greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                                pad_token_id=0).numpy()
    assert np.array_equal(ORTCausalLM(out).generate(prompt.numpy(), max_new_tokens=16), greedy)
    assert np.array_equal(GenAICausalLM(out).generate(prompt.numpy(), max_new_tokens=16), greedy)


def test_builder_graph_of_a_quantized_low_rank_model(low_rank_folders, tokens):
    """A low-rank folder that ``asvd quantize`` wrote (each factor on its own int4 grid): every factor is a
    MatMulNBits from its codes, no float weight is left, and ORT (at float compute) and onnxruntime-genai compute
    the PyTorch model."""
    import onnx

    from asvd_passes.models import load_model_and_tokenizer
    from asvd_passes.quantization.calibrate import grids_of, load_sidecar
    from conftest import assert_ort_computes_the_grid
    from exporters import GenAICausalLM
    from exporters.onnx_export import METADATA_FILE, MODEL_FILE

    folder, out = low_rank_folders / "int4", low_rank_folders / "int4-onnx"
    assert main(["export", "onnx", str(folder), "--out", str(out), "--weights", "int4", "--graph", "builder"]) == 0
    model, _ = load_model_and_tokenizer(str(folder))
    grids = grids_of(model, load_sidecar(folder))
    assert any(name.endswith(".down") for name in grids) and any(name.endswith(".up") for name in grids)
    metadata = json.loads((out / METADATA_FILE).read_text())["quantized"]
    assert metadata["from_recorded_grids"] == len(grids) and metadata["low_rank_projections"] > 0
    assert not metadata["float_weight_matmuls"] and metadata["tied_embedding_shared"]
    ops = collections.Counter(node.op_type for node in onnx.load(str(out / MODEL_FILE)).graph.node)
    assert ops["MatMulNBits"] == len(grids) and ops["MatMul"] == 0 and ops["GroupQueryAttention"] == 2
    prompt = tokens(1, 5, seed=2)
    with torch.no_grad():
        greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                                pad_token_id=0).numpy()
    assert_ort_computes_the_grid(model, out, tokens(2, 12, seed=4))  # float compute from here on
    assert np.array_equal(GenAICausalLM(out).generate(prompt.numpy(), max_new_tokens=16), greedy)


BUILT_EXACTLY = ("llama", "llama3", "qwen2", "qwen3")  # the builder's graph of these computes the model
REFUSED = {"mistral": "sliding-window", "gemma2": "sliding-window", "opt": "not currently supported",
           "gpt2": "not currently supported", "olmo2": "not currently supported", "gpt_neox": "not currently supported",
           "phi3": "could not build", "gemma3": "could not build"}


@pytest.mark.parametrize("family", [*BUILT_EXACTLY, *REFUSED])
def test_builder_graph_of_each_family(family, tmp_path, tokens):
    """Every family we compress, at head size 16: exported and exact in ORT where the builder builds it right;
    otherwise a clear error and nothing written: the builder does not support it (OPT, GPT-2, OLMo 2, GPT-NeoX),
    fails on the tiny config (Phi-3 without long-rope factors, Gemma 3's rope parameters), or keeps window-sized
    caches for sliding-window layers, which our runner does not feed (Mistral and Gemma 2, window 8 here)."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config, word_tokenizer
    from exporters import ORTCausalLM, export_onnx

    config = tiny_config(family)
    config.hidden_size = 64
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = 16
    else:
        config.num_attention_heads = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "model")
    word_tokenizer()[0].save_pretrained(tmp_path / "model")
    if family in REFUSED:
        with pytest.raises(InvalidInputError, match=REFUSED[family]):
            export_onnx(str(tmp_path / "model"), tmp_path / "onnx", graph="builder")
        assert not (tmp_path / "onnx").exists() and not list(tmp_path.glob("*asvd-builder*"))
        return
    export_onnx(str(tmp_path / "model"), tmp_path / "onnx", graph="builder")
    ids = tokens(2, 12, seed=4)
    with torch.no_grad():
        expected = model(ids).logits.numpy()
    got = ORTCausalLM(tmp_path / "onnx", threads=1).logits(ids.numpy())
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()


def test_builder_graph_refuses_what_it_cannot_carry(quantized_folder, low_rank_folders, tmp_path, tiny_model):
    """Before any work: int4 without recorded grids, a format the grids are not, fp16, a model object, a latent KV
    cache; and after the build, a model whose builder graph does not compute what transformers computes (found on
    a tiny Llama whose MLP is twice its width: the builder's fp32 graph is off by a third of the logits' scale)."""
    from exporters import export_onnx

    from asvd_passes import ASVDCompressor, ASVDConfig
    from conftest import token_batch, word_tokenizer

    model, _, root = quantized_folder
    with pytest.raises(InvalidInputError, match="asvd quantize"):
        export_onnx(str(low_rank_folders / "pair"), tmp_path / "a", weights="int4", graph="builder")
    with pytest.raises(InvalidInputError, match="8-bit|does not describe"):
        export_onnx(str(root / "q"), tmp_path / "b", weights="int8", graph="builder")
    with pytest.raises(InvalidInputError, match="folder"):
        export_onnx(model, tmp_path / "c", weights="int4", graph="builder")
    with pytest.raises(InvalidInputError, match="fp32"):
        export_onnx(str(root / "q"), tmp_path / "d", weights="fp16", graph="builder")
    compressor = ASVDCompressor(tiny_model("llama"))
    compressor.compress(ASVDConfig(param_ratio=None, kv_ratio=0.5), calibration=token_batch(4, 16),
                        save_dir=tmp_path / "latent", progress=False)
    word_tokenizer()[0].save_pretrained(tmp_path / "latent")
    with pytest.raises(InvalidInputError, match="latent KV cache"):
        export_onnx(str(tmp_path / "latent"), tmp_path / "f", graph="builder")
    assert not any((tmp_path / name).exists() for name in "abcdf")

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
