"""int8/int4 exports through ONNX Runtime's MatMulNBits quantizer, ORT perplexity, and their clear errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import asvd_passes as ap
from asvd_passes.cli import main
from exporters import ORTCausalLM, export_onnx
from exporters.onnx_export import METADATA_FILE, MODEL_FILE
from exporters.quantize import CPU_ACCURACY_LEVEL

pytest.importorskip("onnx_ir")  # the quantizer's own dependency (declared by this package)


@pytest.fixture(scope="module")
def compressed_llama():
    from conftest import make_tiny_model, token_batch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    model = make_tiny_model("llama")
    config = ap.ASVDConfig(method="whiten", seqlen=16, calib_samples=4, param_ratio=0.8, kv_ratio=0.5)
    ap.ASVDCompressor(model).compress(config, calibration=token_batch(4, 16, seed=9), progress=False)
    torch.set_num_threads(previous)
    return model


@pytest.fixture(scope="module")
def exports(compressed_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {weights: (export_onnx(compressed_llama, root / weights, layout="genai", weights=weights, block_size=16),
                      root / weights)
            for weights in ("fp32", "int8", "int4")}


def _linear_count(model) -> int:
    from transformers.pytorch_utils import Conv1D

    return sum(isinstance(m, (torch.nn.Linear, Conv1D)) for m in model.modules())


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_every_weight_matmul_is_quantized(weights, exports, compressed_llama):
    """Every Linear (dense projections, both thin factors, latent K/V down/up, LM head) becomes MatMulNBits."""
    meta, folder = exports[weights]
    proto = onnx.load(str(folder / MODEL_FILE))
    ops = [node.op_type for node in proto.graph.node]
    assert meta.quantized["float_weight_matmuls"] == []
    assert ops.count("MatMulNBits") == _linear_count(compressed_llama) == meta.quantized["ops"]["MatMulNBits"]
    bits = {attr.i for node in proto.graph.node if node.op_type == "MatMulNBits" for attr in node.attribute
            if attr.name == "bits"}
    assert bits == {int(weights[3:])}
    # The builder's CPU setting (int8 compute): without it ORT dequantizes every block on every call.
    levels = [next((attr.i for attr in node.attribute if attr.name == "accuracy_level"), 0)
              for node in proto.graph.node if node.op_type == "MatMulNBits"]
    assert set(levels) == {CPU_ACCURACY_LEVEL} and meta.quantized["accuracy_level"] == CPU_ACCURACY_LEVEL
    if weights == "int4":  # the embedding table too (GatherBlockQuantized is 4-bit only in ORT's quantizer)
        assert ops.count("GatherBlockQuantized") == 1 and meta.quantized["float_embedding_gathers"] == []
    else:
        assert meta.quantized["float_embedding_gathers"]
    saved = json.loads((folder / METADATA_FILE).read_text())
    assert saved["weights"] == weights and saved["block_size"] == 16


def test_quantized_logits_stay_close_and_files_shrink(exports, compressed_llama, tokens):
    ids = tokens(2, 12, seed=4)
    with torch.no_grad():
        expected = compressed_llama(ids).logits.numpy()
    scale = np.abs(expected).max()
    errors, sizes = {}, {}
    for weights, (_, folder) in exports.items():
        errors[weights] = np.abs(ORTCausalLM(folder, threads=1).logits(ids.numpy()) - expected).max() / scale
        sizes[weights] = (folder / MODEL_FILE).stat().st_size
    assert errors["fp32"] < 1e-5
    # Quantized for real, and still the same model. int8 includes the rounding of the activations to int8 per
    # block that accuracy level 4 adds (about as large as the weights' own 8-bit rounding here).
    assert errors["int8"] < 0.02 < errors["int4"] < 0.3
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]


def test_genai_runs_the_int4_export(exports, tokens):
    from exporters import GenAICausalLM

    pytest.importorskip("onnxruntime_genai")
    _, folder = exports["int4"]
    prompt = tokens(1, 5, seed=2).numpy()
    ours = ORTCausalLM(folder, threads=1).generate(prompt, max_new_tokens=16)
    assert np.array_equal(GenAICausalLM(folder).generate(prompt, max_new_tokens=16), ours)


def test_bad_block_size_is_a_clear_error_before_any_work(compressed_llama, tmp_path):
    with pytest.raises(ValueError, match="--block-size 48 is not supported"):
        export_onnx(compressed_llama, tmp_path / "out", weights="int4", block_size=48)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="--weights must be one of"):
        export_onnx(compressed_llama, tmp_path / "out", weights="int3")


def test_int4_export_of_the_interpolative_form_is_a_clear_error(tmp_path):
    """Its coefficients amplify 4-bit rounding (SmolLM2: perplexity 49.5 -> 32,482): refused before any work,
    while int8 (within 0.5 perplexity there) still exports."""
    from conftest import make_tiny_model, token_batch

    model = make_tiny_model("llama")
    config = ap.ASVDConfig(method="whiten", seqlen=16, calib_samples=4, param_ratio=0.8, lowrank_form="interpolative")
    ap.ASVDCompressor(model).compress(config, calibration=token_batch(4, 16, seed=9), progress=False)
    assert any(isinstance(m, ap.LowRankLinear) and m.interpolative for m in model.modules())
    with pytest.raises(ValueError, match="--weights int4 would destroy this model.*interpolative low-rank form"):
        export_onnx(model, tmp_path / "int4", weights="int4", block_size=16)
    assert not (tmp_path / "int4").exists()
    meta = export_onnx(model, tmp_path / "int8", weights="int8", block_size=16)
    assert meta.quantized["float_weight_matmuls"] == []


def test_provider_without_nbit_kernels_is_a_clear_error(exports):
    _, folder = exports["int4"]
    with pytest.raises(ValueError, match="MatMulNBits nodes.*CoreMLExecutionProvider has no kernel"):
        ORTCausalLM(folder, provider="coreml")
    with pytest.raises(ValueError, match="GatherBlockQuantized.*DmlExecutionProvider has no kernel"):
        ORTCausalLM(folder, provider="dml")


def test_cli_eval_of_an_export_is_computed_by_onnx_runtime(compressed_llama, exports, tmp_path, capsys):
    """``asvd eval ONNX_DIR`` gives the PyTorch perplexity for fp32 and a different one for int4."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from asvd_passes.evaluate import perplexity

    words = [f"w{i}" for i in range(3, 128)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words, start=3)} | {"<unk>": 0}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    rng = np.random.default_rng(0)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(rng.choice(words, size=200)))
    results = {}
    for weights in ("fp32", "int4"):
        folder = exports[weights][1]
        tokenizer.save_pretrained(folder)
        assert main(["eval", str(folder), "--data", str(text), "--seqlen", "32", "--windows", "4", "--json"]) == 0
        results[weights] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    reference = perplexity(compressed_llama, tokenizer, str(text), seqlen=32, windows=4, progress=False)
    assert results["fp32"]["runtime"] == "onnxruntime" and results["fp32"]["windows"] == 4
    assert results["fp32"]["ppl"] == pytest.approx(reference["ppl"], rel=1e-5)
    assert results["int4"]["ppl"] != pytest.approx(reference["ppl"], rel=1e-5)
    assert main(["eval", str(exports["fp32"][1]), "--tasks", "arc_easy"]) == 2  # lm-eval runs PyTorch folders only
    assert "--tasks runs lm-eval on a PyTorch model folder" in capsys.readouterr().err


def test_fp16_weights_run_in_ort_and_genai(compressed_llama, tmp_path, tokens):
    from exporters import GenAICausalLM

    pytest.importorskip("onnxruntime_genai")
    ids = tokens(1, 10, seed=4)
    with torch.no_grad():
        expected = compressed_llama(ids).logits.numpy()
    meta = export_onnx(compressed_llama, tmp_path / "fp16", layout="genai", weights="fp16")
    assert meta.dtype == "fp16" and meta.weights == "fp16"
    # The fp16 export casts the model only while it runs: the caller's fp32 model comes back exactly.
    assert all(p.dtype == torch.float32 for p in compressed_llama.parameters())
    with torch.no_grad():
        assert np.array_equal(compressed_llama(ids).logits.numpy(), expected)
    runtime = ORTCausalLM(tmp_path / "fp16", threads=1)
    assert np.abs(runtime.logits(ids.numpy()).astype(np.float32) - expected).max() < 5e-3
    prompt = ids[:, :5].numpy()
    assert np.array_equal(GenAICausalLM(tmp_path / "fp16").generate(prompt, max_new_tokens=8),
                          runtime.generate(prompt, max_new_tokens=8))
