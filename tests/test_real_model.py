"""End to end on the real SmolLM2-135M (CPU): compress → save → load → evaluate, via the CLI.

These read WikiText-2 from ``../shared/data`` (never copied into the repo). Windows and
calibration sizes follow the issue's protocol where a bar is asserted; see docs/BENCHMARKS.md for timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(os.environ.get("ASVD_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")) / "wikitext-2"
TEST_SPLIT = DATA / "wiki.test.raw"
VALID_SPLIT = DATA / "wiki.valid.tokens"
DENSE_PPL = 28.30  # shared/data/README.md: the Q4_1 GGUF dequantized to fp32, CPU, 30 windows of 512 tokens

pytestmark = pytest.mark.real_model


def _require_data():
    if not TEST_SPLIT.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"WikiText-2 data missing at {DATA}")
        pytest.skip(f"WikiText-2 data not found at {DATA}")


def asvd(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "asvd_passes.cli", *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def eval_json(model: str, windows: int) -> dict:
    out = asvd("eval", model, "--data", str(TEST_SPLIT), "--seqlen", "512", "--windows", str(windows), "--json")
    return json.loads(out.strip().splitlines()[-1])


def test_dense_perplexity_matches_reference():
    _require_data()
    result = eval_json("default", 30)
    assert result["seqlen"] == 512 and result["windows"] == 30
    assert abs(result["ppl"] - DENSE_PPL) / DENSE_PPL < 0.01, result


def test_whiten_095_compress_save_load_eval(tmp_path):
    """The issue's floor: uniform whitening at ratio 0.95 stays under perplexity 70; the saved folder loads in plain
    transformers, and its export in the builder's fused graph computes the same perplexity in ONNX Runtime."""
    _require_data()
    out = tmp_path / "smollm2-whiten-095"
    asvd(
        "compress", "--out", str(out), "--method", "whiten", "--allocation", "uniform", "--param-ratio", "0.95",
        "--calib", str(VALID_SPLIT), "--calib-samples", "16", "--seqlen", "512", "--seed", "0",
    )
    report = json.loads((out / "asvd_report.json").read_text())
    assert 0.94 < report["selected_ratio"] <= 0.95
    assert not list(out.glob("*.bin"))
    # One file, or shards written block by block (the sequential path reads and writes one block at a time).
    assert (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file()
    assert (out / "ranks.png").stat().st_size > 0
    result = eval_json(str(out), 30)
    assert result["ppl"] <= 70.0, result

    # The saved folder rebuilds the factored modules with plain transformers and gives the same logits.
    import asvd_passes  # noqa: F401
    from transformers import AutoModelForCausalLM

    first = AutoModelForCausalLM.from_pretrained(out)
    second = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(first.model.layers[0].self_attn.q_proj, asvd_passes.LowRankLinear)
    ids = torch.arange(100, 164)[None]
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)

    # The low-rank folder in onnxruntime-genai's fused graph (--graph builder): ONNX Runtime's perplexity is
    # PyTorch's, and onnxruntime-genai's greedy tokens are PyTorch's.
    from transformers import AutoTokenizer

    from exporters import GenAICausalLM

    fast = tmp_path / "smollm2-whiten-095-builder-graph"
    asvd("export", "onnx", str(out), "--out", str(fast), "--graph", "builder")
    quantized = json.loads((fast / "asvd_onnx.json").read_text())["quantized"]
    assert quantized["low_rank_projections"] == sum(isinstance(m, asvd_passes.LowRankLinear) for m in first.modules())
    assert quantized["ops"].get("MatMul", 0) > 2 * quantized["low_rank_projections"]
    deployed = eval_json(str(fast), 30)
    assert abs(deployed["ppl"] - result["ppl"]) <= 1e-3 * result["ppl"], (deployed, result)
    prompt, reference = _greedy_reference(first, AutoTokenizer.from_pretrained(out), "The history of the city begins")
    assert np.array_equal(GenAICausalLM(fast).generate(prompt.numpy(), max_new_tokens=32), reference.numpy())


def test_full_rank_rewrite_keeps_dense_perplexity():
    """Every projection factored at rank min(in, out): perplexity within 0.1% of dense."""
    _require_data()
    from asvd_passes import ASVDCompressor, ASVDConfig, perplexity

    compressor = ASVDCompressor.from_pretrained(None)
    dense = perplexity(compressor.model, compressor.tokenizer, str(TEST_SPLIT), 512, 10, progress=False)
    shapes = {
        name: min(m.in_features, m.out_features)
        for name, m in compressor.model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    }
    config = ASVDConfig(method="whiten", param_ratio=None, ranks=shapes, calibration=str(VALID_SPLIT), calib_samples=4, seqlen=512)
    compressor.compress(config, progress=False)
    full = perplexity(compressor.model, compressor.tokenizer, str(TEST_SPLIT), 512, 10, progress=False)
    assert abs(full["ppl"] - dense["ppl"]) / dense["ppl"] < 1e-3, (dense, full)


def test_latent_kv_half_cache(tmp_path):
    """Issue bar: --kv-ratio 0.5 --method whiten (default KV allocation) stays under perplexity 36 and
    the cache measured after a real forward holds exactly half the dense bytes per token."""
    _require_data()
    out = tmp_path / "smollm2-kv-05"
    stdout = asvd(
        "compress", "--out", str(out), "--method", "whiten", "--kv-ratio", "0.5",
        "--calib", str(VALID_SPLIT), "--calib-samples", "16", "--seqlen", "512", "--seed", "0",
    )
    assert "latent KV cache: ratio 0.5000" in stdout
    info = json.loads(asvd("inspect", str(out), "--json").strip().splitlines()[-1])
    assert info["dense_kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 4  # 30 layers, K+V, 3 KV heads of 64, fp32
    assert info["kv_bytes_per_token"] * 2 == info["dense_kv_bytes_per_token"]
    assert info["param_ratio"] == 1.0 and info["kv_ratio"] == 0.5
    result = eval_json(str(out), 30)
    assert result["ppl"] <= 36.0, result


@pytest.fixture
def compressed_09_kv05(smollm2_09_kv05):
    """SmolLM2 with --param-ratio 0.9 --kv-ratio 0.5: (model, tokenizer, folder), shared by the session (conftest)."""
    return smollm2_09_kv05


def _greedy_reference(model, tokenizer, prompt_text: str, tokens: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids, PyTorch's greedy continuation of ``tokens`` new tokens, prompt included)."""
    prompt = torch.tensor([tokenizer(prompt_text)["input_ids"]])
    return prompt, model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)


def test_onnx_runtime_matches_pytorch_on_compressed_smollm2(tmp_path, step_logits, compressed_09_kv05):
    """SmolLM2 with --param-ratio 0.9 --kv-ratio 0.5, exported: ORT logits equal PyTorch's (prefill + 20
    decode steps, max abs diff <= 2e-4 in fp32 on logits up to ~13: 1.5e-5 relative, the summation-order noise of
    30 fp32 blocks; 1.53e-4 was seen when the fixture compressed under xdist) and greedy generation of 32 tokens
    is identical."""
    import numpy as np

    from exporters import ORTCausalLM, export_onnx

    model, tokenizer, folder = compressed_09_kv05
    meta = export_onnx(folder, tmp_path / "onnx")
    assert meta.kind == "latent" and len(meta.cache) == 2 * 30
    runtime = ORTCausalLM(tmp_path / "onnx")

    ids = torch.tensor([tokenizer(TEST_SPLIT.read_text()[:4000])["input_ids"][:64 + 20]])
    prefill = 64
    torch_steps, ort_steps = step_logits
    got, past = ort_steps(runtime, ids, prefill)
    assert np.abs(got - torch_steps(model, ids, prefill)).max() <= 2e-4
    for entry, tensor in zip(meta.cache, past):  # latent widths exactly as in the metadata
        assert tensor.shape == (1, ids.shape[1], entry.fixed["width"])

    prompt, reference = _greedy_reference(model, tokenizer, "The history of the city begins")
    assert np.array_equal(runtime.generate(prompt.numpy(), max_new_tokens=32), reference.numpy())


def test_onnxruntime_genai_generates_what_pytorch_does(tmp_path, compressed_09_kv05):
    """Issue bar: onnxruntime-genai, a runtime we did not write, runs the --genai export of SmolLM2 (param 0.9 +
    KV 0.5, latent cache packed in genai's 4-D slots): its greedy 32 tokens equal PyTorch's and our ORT runtime's,
    and its logits over a 64-token prefill + 8 decode steps stay within 1e-4 of PyTorch's."""
    import numpy as np

    from exporters import GenAICausalLM, ORTCausalLM, export_onnx

    model, tokenizer, folder = compressed_09_kv05
    meta = export_onnx(folder, tmp_path / "genai", layout="genai")
    assert meta.layout == "genai" and (tmp_path / "genai" / "genai_config.json").is_file()
    assert sum(2 * p["width"] for p in meta.packing.values()) - sum(p["key"] + p["value"] for p in meta.packing.values()) <= 30
    genai = GenAICausalLM(tmp_path / "genai")
    prompt, reference = _greedy_reference(model, tokenizer, "The history of the city begins")
    generated = genai.generate(prompt.numpy(), max_new_tokens=32)
    assert np.array_equal(generated, reference.numpy())
    og_tokenizer = genai.tokenizer()  # genai's own tokenizer reads the exported tokenizer.json
    assert list(og_tokenizer.encode("The history of the city begins")) == prompt[0].tolist()
    plain = np.array([t for t in generated[0] if t not in tokenizer.all_special_ids], dtype=np.int32)
    assert og_tokenizer.decode(plain) == tokenizer.decode(plain.tolist())
    assert np.array_equal(ORTCausalLM(tmp_path / "genai").generate(prompt.numpy(), max_new_tokens=32), generated)

    ids = torch.tensor([tokenizer(TEST_SPLIT.read_text()[:4000])["input_ids"][:72]])
    with torch.no_grad():
        expected = model(ids).logits[:, 63:].numpy()
    assert np.abs(genai.step_logits(ids.numpy(), prefill=64) - expected).max() <= 1e-4


def test_int4_export_is_small_and_evaluated_by_onnx_runtime(tmp_path, compressed_09_kv05):
    """Issue bar: the ASVD 0.9 int4 export is at most 0.15× the dense fp32 model's bytes (4 × 134.5M parameters:
    the dense fp32 export is that plus its graph), every weight MatMul is 4-bit, and ONNX Runtime computes its
    perplexity (5 windows here; the full table is benchmarks/deploy.py's). Block 64: at block 32 the fp32 scales
    and zero points add 1.1 bits per weight and the file is 0.154× (docs/BENCHMARKS.md); at block 128, which does not divide
    SmolLM2's hidden 576, the embedding and the LM head quantize their last block differently and cannot share."""
    from exporters import ORTCausalLM, export_onnx
    from asvd_passes.models import load_model_and_tokenizer

    _, _, folder = compressed_09_kv05
    meta = export_onnx(folder, tmp_path / "int4", weights="int4", block_size=64, layout="genai")
    dense, _ = load_model_and_tokenizer(None)
    dense_fp32_bytes = 4 * sum(p.numel() for p in dense.parameters())
    size = sum(f.stat().st_size for f in (tmp_path / "int4").glob("model.onnx*"))
    assert size <= 0.15 * dense_fp32_bytes, (size, dense_fp32_bytes)
    assert meta.quantized["float_weight_matmuls"] == [] and meta.quantized["float_weight_nodes"] == []
    assert meta.quantized["tied_embedding_shared"] is True
    result = ORTCausalLM(tmp_path / "int4").perplexity(str(TEST_SPLIT), seqlen=512, windows=5, progress=False)
    assert result["weights"] == "int4" and 28.0 < result["ppl"] < 150.0, result  # quantized, not destroyed


def test_byte_budget_plan_fits_its_file_and_runs_in_onnx_runtime(tmp_path):
    """``asvd quantize --budget-mib 70.1`` (15% below the builder's int4 file, 82.5 MiB): the written ONNX file
    fits the budget, the plan mixes 2- and 4-bit grids, and ONNX Runtime's
    perplexity (accuracy level 4) stays within 3% of PyTorch's fake-quant figure on the same 3 windows and
    within 1.5× dense (2-bit everywhere would be thousands). The quality bar is measured on the full protocol
    by benchmarks/deploy.py (16 calibration windows there, 8 here)."""
    from exporters import ORTCausalLM
    from exporters.onnx_export import MODEL_FILE

    _require_data()
    folder, onnx_dir = tmp_path / "q", tmp_path / "q-onnx"
    from asvd_passes.cli import main

    # In-process (the CLI's own entry point), so the model loads once per step without a new interpreter.
    assert main(["quantize", "default", "--out", str(folder), "--budget-mib", "70.1", "--calib", str(VALID_SPLIT),
                 "--calib-samples", "8", "--seqlen", "512"]) == 0
    settings = json.loads((folder / "asvd_nbits.json").read_text())["budget"]
    assert settings["head"] in ("int4/64", "int4/32"), settings  # 128 does not divide SmolLM2's hidden 576
    assert {"int2", "int4"} <= {grid.split("/")[0] for grid in settings["choices"]}, settings
    assert main(["export", "onnx", str(folder), "--out", str(onnx_dir), "--weights", "int4", "--block-size", "32"]) == 0
    size = sum(f.stat().st_size for f in onnx_dir.glob(f"{MODEL_FILE}*"))
    assert size <= 70.1 * 2**20, size
    ort_ppl = ORTCausalLM(onnx_dir).perplexity(str(TEST_SPLIT), seqlen=512, windows=3, progress=False)["ppl"]
    torch_ppl = eval_json(str(folder), 3)["ppl"]
    assert abs(ort_ppl - torch_ppl) < 0.03 * torch_ppl, (ort_ppl, torch_ppl)
    assert ort_ppl < 1.5 * DENSE_PPL, ort_ppl
    # The same codes in onnxruntime-genai's builder's graph (--graph builder: fused attention and norms): the
    # perplexity of our graph (within 1%: int8 activation rounding flips with any change of float order), and
    # onnxruntime-genai generates what our ORT runner generates from it.
    builder_dir = tmp_path / "q-builder-graph"
    assert main(["export", "onnx", str(folder), "--out", str(builder_dir), "--weights", "int4", "--graph", "builder"]) == 0
    assert sum(f.stat().st_size for f in builder_dir.glob(f"{MODEL_FILE}*")) <= 70.1 * 2**20  # the budget holds here too
    runtime = ORTCausalLM(builder_dir)
    builder_ppl = runtime.perplexity(str(TEST_SPLIT), seqlen=512, windows=3, progress=False)["ppl"]
    assert abs(builder_ppl - ort_ppl) < 0.01 * ort_ppl, (builder_ppl, ort_ppl)  # accuracy level 4 rounds activations
    pytest.importorskip("onnxruntime_genai")
    from exporters import GenAICausalLM

    prompt = np.asarray([[1, 504, 3357, 314]], dtype=np.int64)
    assert np.array_equal(GenAICausalLM(builder_dir).generate(prompt, max_new_tokens=16),
                          runtime.generate(prompt, max_new_tokens=16))
