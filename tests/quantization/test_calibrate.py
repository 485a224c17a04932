"""GPTQ of a whole tiny model: a float checkpoint on the grid, its sidecar, and an ONNX export that keeps the codes."""

from __future__ import annotations

import onnx
import pytest
import torch

from asvd_passes.errors import InvalidInputError
from asvd_passes.quantization.calibrate import grids_of, load_sidecar, quantize_model, save_quantized

pytest.importorskip("onnx_ir")


@pytest.fixture(scope="module")
def quantized_llama():
    from conftest import make_tiny_model, token_batch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    model = make_tiny_model("llama")
    grids = quantize_model(model, token_batch(4, 16, seed=9), bits=4, block_size=16, progress=False)
    torch.set_num_threads(previous)
    return model, grids


def test_every_linear_is_quantized_onto_its_grid(quantized_llama):
    model, grids = quantized_llama
    linears = {name for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert set(grids) == linears and "lm_head" in grids
    for name, grid in grids.items():  # the weights the model computes with are the grid's dequantized values
        assert torch.equal(model.get_submodule(name).weight, grid.dequantize())


def test_folder_loads_as_float_and_keeps_the_grids(quantized_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model, grids = quantized_llama
    save_quantized(model, None, grids, tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    again = grids_of(loaded, load_sidecar(tmp_path / "q"))
    assert all(torch.equal(again[name].codes, grid.codes) for name, grid in grids.items())
    with torch.no_grad():
        loaded.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    with pytest.raises(InvalidInputError, match="grid"):
        grids_of(loaded, load_sidecar(tmp_path / "q"))


def test_export_writes_the_recorded_codes(quantized_llama, tmp_path, tokens):
    """Every MatMul comes from the recorded grids (tied head shared with the 4-bit embedding), and ORT's
    logits (accuracy level 0) match the PyTorch model that computes with the dequantized weights."""
    from conftest import assert_ort_computes_the_grid
    from exporters import export_onnx
    from exporters.onnx_export import MODEL_FILE

    model, grids = quantized_llama
    meta = export_onnx(model, tmp_path / "onnx", weights="int4", block_size=16, grids=grids)
    assert meta.quantized["from_recorded_grids"] == len(grids)
    assert meta.quantized["float_weight_matmuls"] == [] and meta.quantized["tied_embedding_shared"]
    # Bytes predicted from the grids = N-bit bytes written (the embedding reads the head's, adding none).
    assert meta.quantized["quantized_bytes"] == sum(grid.nbytes() for grid in grids.values())
    proto = onnx.load(str(tmp_path / "onnx" / MODEL_FILE))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(grids)
    assert assert_ort_computes_the_grid(model, tmp_path / "onnx", tokens(2, 12, seed=4)) == len(grids)


def test_refusals():
    from conftest import make_tiny_model, token_batch

    model = make_tiny_model("llama")
    with pytest.raises(InvalidInputError, match="algorithm"):
        quantize_model(model, token_batch(1, 8), algorithm="awq")
    with pytest.raises(InvalidInputError, match="float32"):
        quantize_model(model.to(torch.bfloat16), token_batch(1, 8))


def test_block_offsets_survive_the_folder_and_the_export(tmp_path, tokens):
    """``offsets=True``: decoder-block matrices carry block offsets (the head keeps integer zero points, so the
    tied embedding still shares its tensors); the sidecar keeps them, the export writes one offset MatMul per
    matrix (plus one block-sum per distinct input), bytes predicted = bytes written, and ORT's logits match."""
    from transformers import AutoModelForCausalLM

    from conftest import assert_ort_computes_the_grid, make_tiny_model, token_batch
    from exporters import export_onnx

    model = make_tiny_model("llama")
    grids = quantize_model(model, token_batch(4, 16, seed=9), bits=4, block_size=16, offsets=True, progress=False)
    assert {name for name, q in grids.items() if q.offsets is None} == {"lm_head"}
    save_quantized(model, None, grids, tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    again = grids_of(loaded, load_sidecar(tmp_path / "q"))
    assert all(torch.equal(again[name].offsets, q.offsets) for name, q in grids.items() if q.offsets is not None)
    meta = export_onnx(loaded, tmp_path / "onnx", weights="int4", block_size=16, grids=again)
    summary = meta.quantized
    assert summary["from_recorded_grids"] == len(grids) and summary["tied_embedding_shared"]
    assert summary["float_weight_matmuls"] == []
    assert summary["block_offset_matmuls"] == (len(grids) - 1) + 4 * model.config.num_hidden_layers  # q/k/v, o, gate/up, down
    assert summary["quantized_bytes"] == sum(q.nbytes() for q in grids.values())
    assert assert_ort_computes_the_grid(loaded, tmp_path / "onnx", tokens(2, 12, seed=4)) == len(grids)
