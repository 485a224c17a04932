"""A quantized latent cache exports as QuantizeLinear / DequantizeLinear around int8 (or packed 4-bit uint8)
cache inputs and outputs, and runs in ONNX Runtime and onnxruntime-genai like the PyTorch model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import asvd_passes as ap
from asvd_passes.inspect_model import measure_kv_bytes_per_token
from exporters import GenAICausalLM, ORTCausalLM, export_onnx
from exporters.onnx_export import METADATA_FILE

CASES = [("qwen3", 4, "asvd"), ("llama", 8, "genai"), ("gpt2", 4, "genai")]


@pytest.fixture(scope="module")
def quantized_export(tmp_path_factory, tiny_model_module, tokens_module):
    """``quantized_export(family, bits, layout)`` → (PyTorch model, export folder), each made once per module."""
    models, folders = {}, {}

    def get(family, bits, layout):
        if (family, bits) not in models:
            model = tiny_model_module(family)
            config = ap.ASVDConfig(method="whiten", seqlen=16, calib_samples=4, kv_ratio=0.5, kv_bits=bits)
            ap.ASVDCompressor(model).compress(config, calibration=tokens_module(4, 16, seed=9), progress=False)
            models[(family, bits)] = model
        if (family, bits, layout) not in folders:
            folder = tmp_path_factory.mktemp(f"{family}-{bits}-{layout}") / "onnx"
            export_onnx(models[(family, bits)], folder, layout=layout)
            folders[(family, bits, layout)] = folder
        return models[(family, bits)], folders[(family, bits, layout)]

    return get


@pytest.fixture(scope="module")
def tiny_model_module():
    from conftest import make_tiny_model

    return make_tiny_model


@pytest.fixture(scope="module")
def tokens_module():
    from conftest import token_batch

    return token_batch


@pytest.mark.parametrize("family, bits, layout", CASES)
def test_quantized_cache_runs_in_ort_like_pytorch(family, bits, layout, quantized_export, tokens, step_logits):
    model, folder = quantized_export(family, bits, layout)
    graph = onnx.load(str(folder / "model.onnx"))
    ops = [node.op_type for node in graph.graph.node]
    layers = model.config.num_hidden_layers
    assert ops.count("QuantizeLinear") == 2 * layers and ops.count("DequantizeLinear") == 2 * layers
    code_type = onnx.TensorProto.INT8 if bits == 8 else onnx.TensorProto.UINT8
    caches = [i for i in graph.graph.input if i.name.startswith("past_")] + [
        o for o in graph.graph.output if o.name.startswith("present")]
    assert len(caches) == 4 * layers and all(c.type.tensor_type.elem_type == code_type for c in caches)
    assert json.loads((folder / METADATA_FILE).read_text())["kv_bits"] == bits

    torch_logits, ort_logits = step_logits
    ids = tokens(2, 14, seed=1)
    expected = torch_logits(model, ids, prefill=6)
    got, present = ort_logits(ORTCausalLM(folder, threads=1), ids, prefill=6)
    assert np.abs(got - expected).max() <= 1e-4
    # The cache ORT hands back holds the bytes PyTorch's cache object holds (genai's slots: +1 byte for an odd sum).
    stored = sum(p.nbytes for p in present) // (2 * ids.shape[1])
    assert stored - measure_kv_bytes_per_token(model) in ((0,) if layout == "asvd" else range(0, layers + 1))


@pytest.mark.parametrize("family, bits", [(f, b) for f, b, layout in CASES if layout == "genai"])
def test_genai_generates_from_a_quantized_cache(family, bits, quantized_export, tokens):
    model, folder = quantized_export(family, bits, "genai")
    ids = tokens(2, 14, seed=1)
    got = GenAICausalLM(folder).step_logits(ids.numpy(), prefill=6)
    with torch.no_grad():
        expected = model(ids).logits[:, 5:].numpy()
    assert np.abs(got - expected).max() <= 1e-4
    prompt = tokens(1, 5, seed=2)
    greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                            pad_token_id=0).numpy()
    assert np.array_equal(GenAICausalLM(folder).generate(prompt.numpy(), max_new_tokens=32), greedy)
