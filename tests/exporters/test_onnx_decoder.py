"""``ONNXDecoder`` and ``asvd eval`` on folders written by onnxruntime-genai's model builder (the anchor users
compare with): GroupQueryAttention, no position_ids, and an int8 KV cache with calibrated scales."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from asvd_passes.cli import main
from conftest import word_tokenizer
from exporters import ONNXDecoder

pytest.importorskip("onnxruntime_genai")
pytestmark = pytest.mark.xdist_group("genai-builder")  # one worker builds the module's folders once

LAYERS, KV_HEADS, HEAD_SIZE = 2, 2, 16  # GroupQueryAttention's CPU kernel wants head sizes in multiples of 16


def build(source, out, *extra_options) -> None:
    """``python -m onnxruntime_genai.models.builder ...``, run in this process (its imports cost ~5 s once)."""
    import runpy
    from unittest import mock

    argv = ["builder", "-i", str(source), "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "cache")]
    with mock.patch.object(sys, "argv", argv + (["--extra_options", *extra_options] if extra_options else [])):
        runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
    assert (out / "model.onnx").is_file() and (out / "genai_config.json").is_file()


@pytest.fixture(scope="module")
def builder_folders(tmp_path_factory):
    """A tiny random Llama, its builder fp32 model, and the same with an int8 per-tensor KV cache whose scales
    the builder's own calibration tool computed on the fp32 model."""
    from conftest import tiny_config
    from onnxruntime_genai.models.quantization.kv_cache_calibration import calibrate_kv_scales
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("builder")
    config = tiny_config("llama")
    config.hidden_size, config.head_dim = KV_HEADS * 2 * HEAD_SIZE, HEAD_SIZE
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    tokenizer, words = word_tokenizer()
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    build(root / "hf", root / "fp32")
    corpus = [" ".join(np.random.default_rng(1).choice(words, size=400))]
    calibrate_kv_scales(str(root / "fp32" / "model.onnx"), str(root / "fp32"), str(root / "scales.json"),
                        quant_type="int8_per_tensor", target_seq=32, num_seqs=4, corpus=corpus)
    build(root / "hf", root / "kv8", "kv_cache_quant_scheme=int8_per_tensor", f"kv_cache_scale_file={root / 'scales.json'}")
    text = root / "text.txt"
    text.write_text(" ".join(np.random.default_rng(0).choice(words, size=300)))
    return model, tokenizer, root, text


def stepped_logits(decoder: ONNXDecoder, ids: np.ndarray, prefill: int) -> np.ndarray:
    logits, past = decoder.forward(ids[:, :prefill], decoder.empty_cache(ids.shape[0]))
    steps = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, past = decoder.forward(ids[:, t : t + 1], past, position=t)
        steps.append(logits)
    return np.concatenate(steps, axis=1)


def test_builder_model_runs_as_pytorch(builder_folders, tokens):
    """GroupQueryAttention (rotary inside), no position_ids: prefill then cached steps give PyTorch's logits."""
    model, _, root, _ = builder_folders
    ids = tokens(2, 20, seed=3)
    with torch.no_grad():
        expected = model(ids).logits.numpy()
    decoder = ONNXDecoder(root / "fp32", threads=1)
    assert not decoder.has_positions and len(decoder.cache_inputs) == 2 * LAYERS
    assert np.abs(stepped_logits(decoder, ids.numpy(), 12) - expected).max() < 1e-5 * np.abs(expected).max()
    assert decoder.cache_bytes_per_token() == 2 * LAYERS * KV_HEADS * HEAD_SIZE * 4


def test_int8_kv_cache_is_read_as_stored(builder_folders, tokens):
    """The int8 cache is fed and returned as int8 (a quarter of the fp32 bytes); its rounding moves the logits."""
    model, _, root, _ = builder_folders
    ids = tokens(2, 20, seed=3)
    with torch.no_grad():
        expected = model(ids).logits.numpy()
    decoder = ONNXDecoder(root / "kv8", threads=1)
    _, past = decoder.forward(ids.numpy()[:, :4], decoder.empty_cache(2))
    assert {entry.dtype for entry in past} == {np.dtype(np.int8)}
    assert decoder.cache_bytes_per_token() == 2 * LAYERS * KV_HEADS * HEAD_SIZE
    error = np.abs(stepped_logits(decoder, ids.numpy(), 12) - expected).max() / np.abs(expected).max()
    assert 1e-6 < error < 0.02


def test_asvd_eval_of_builder_folders(builder_folders, capsys):
    """One command for any folder: the fp32 builder model gives PyTorch's perplexity, the int8-KV one a close one."""
    from asvd_passes.evaluate import perplexity

    model, tokenizer, root, text = builder_folders
    reference = perplexity(model, tokenizer, str(text), seqlen=32, windows=4, progress=False)["ppl"]
    results = {}
    for name in ("fp32", "kv8"):
        assert main(["eval", str(root / name), "--data", str(text), "--seqlen", "32", "--windows", "4", "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["fp32"]["ppl"] == pytest.approx(reference, rel=1e-5)
    assert results["kv8"]["ppl"] != pytest.approx(reference, rel=1e-6)
    assert results["kv8"]["ppl"] == pytest.approx(reference, rel=0.02)
    assert results["kv8"]["cache_bytes_per_token"] * 4 == results["fp32"]["cache_bytes_per_token"]
    assert main(["eval", str(root / "fp32"), "--data", str(text), "--provider", "cuda"]) == 2
    assert "needs a folder exported by asvd" in capsys.readouterr().err


def test_folder_without_a_decoder_is_a_clear_error(tmp_path):
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "decoder.onnx"}}}))
    with pytest.raises(FileNotFoundError, match="holds no ONNX decoder \\(decoder.onnx"):
        ONNXDecoder(tmp_path)
