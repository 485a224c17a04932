"""Latent-KV models save and reload like weight-compressed ones; both compressions compose; inspect; bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import asvd_passes as ap
from asvd_passes.inspect_model import inspect_model
from asvd_passes.kv import LatentKVAttention


def compress(model, tokens, save_dir=None, **config):
    config.setdefault("method", "whiten")
    config = ap.ASVDConfig(seqlen=16, calib_samples=4, **config)
    return ap.ASVDCompressor(model).compress(config, calibration=tokens(4, 16, seed=9), save_dir=save_dir, progress=False)


def test_weight_and_kv_compression_compose_and_reload(family, tiny_model, tokens, tmp_path):
    model = tiny_model(family)
    report = compress(model, tokens, tmp_path / "out", param_ratio=0.8, kv_ratio=0.5, kv_group_size=1)
    assert report.kv["kv_ratio"] <= 0.5 and report.selected_ratio <= 0.8
    # K/V belong to the KV pass, not to the weight budget.
    assert not any(name.endswith(("k_proj", "v_proj", "qkv_proj", "c_attn")) for name in report.ranks)
    assert any(isinstance(m, ap.LowRankLinear) for m in model.modules())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert sum(isinstance(m, LatentKVAttention) for m in loaded.modules()) == model.config.num_hidden_layers
    ids = tokens(2, 12, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    prompt = tokens(1, 4, seed=2)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


def test_kv_only_leaves_other_projections_dense(tiny_model, tokens, tmp_path):
    """A KV ratio alone (no param_ratio given) compresses K/V only, as ``asvd compress --kv-ratio`` does."""
    model = tiny_model("qwen2")
    report = compress(model, tokens, tmp_path / "out", kv_ratio=0.5)
    assert report.ranks == {} and report.selected_ratio == 1.0
    assert not any(isinstance(m, ap.LowRankLinear) for m in model.modules())
    assert (tmp_path / "out" / "asvd_report.json").is_file() and not (tmp_path / "out" / "ranks.png").exists()


def test_inspect_measures_cache_bytes(tiny_model, tokens, tmp_path):
    model = tiny_model("llama")  # 2 layers, 2 KV heads of 8: dense K+V = 2·2·16 floats per token
    report = compress(model, tokens, tmp_path / "out", param_ratio=0.8, kv_ratio=0.5, kv_allocation="uniform")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    info = inspect_model(loaded, tmp_path / "out")
    assert info["dense_kv_bytes_per_token"] == 2 * 2 * 16 * 4
    assert info["kv_bytes_per_token"] == 2 * 2 * 8 * 4  # uniform 0.5: rank 8 for K and V of each layer
    assert info["kv_ratio"] == 0.5 and info["param_ratio"] == report.selected_ratio
    assert info["kv_ranks"]["model.layers.0.self_attn"] == {"key": [8], "value": [8]}
    dense = inspect_model(tiny_model("llama"))
    assert dense["kv_bytes_per_token"] == dense["dense_kv_bytes_per_token"] == 2 * 2 * 16 * 4 and dense["kv_ratio"] == 1.0


def test_missing_latent_factor_raises(tiny_model, tokens, tmp_path):
    compress(tiny_model("phi3"), tokens, tmp_path / "out", param_ratio=None, kv_ratio=0.5)
    file = next((tmp_path / "out").glob("*.safetensors"))
    tensors = load_file(file)
    key = "model.layers.1.self_attn.v_proj.ups.0.weight"
    assert key in tensors and "model.layers.1.self_attn.q_proj.weight" in tensors
    del tensors[key]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ap.CorruptCompressedModelError, match=key.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_kv_plan_that_does_not_fit_raises(tiny_model, tokens, tmp_path):
    compress(tiny_model("llama"), tokens, tmp_path / "out", param_ratio=None, kv_ratio=0.5)
    config_file = tmp_path / "out" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["kv"]["layers"]["model.layers.7.self_attn"] = {"key": [4], "value": [4]}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ap.CorruptCompressedModelError, match="model.layers.7.self_attn"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_ratio=0.0), r"kv_ratio must lie in \(0, 1\]"),
    (dict(kv_ratio=1.5), r"kv_ratio must lie in \(0, 1\]"),
    (dict(kv_ratio=0.5, kv_group_size=0), "kv_group_size must be a positive integer"),
    (dict(kv_ratio=0.5, kv_allocation="strs"), "Unknown kv_allocation"),
])
def test_bad_kv_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ap.ASVDConfig(param_ratio=None, **kwargs)


def test_group_size_must_divide_kv_heads(tiny_model, tokens, tmp_path):
    with pytest.raises(ValueError, match="kv group size 3 must divide the 2 KV heads"):
        compress(tiny_model("llama"), tokens, tmp_path / "out", param_ratio=None, kv_ratio=0.5, kv_group_size=3)
    assert not (tmp_path / "out").exists()


def test_compressing_a_latent_model_again_is_refused(tiny_model, tokens):
    model = tiny_model("llama")
    compress(model, tokens, param_ratio=None, kv_ratio=0.5)
    with pytest.raises(ValueError, match="already ASVD-compressed"):
        compress(model, tokens, param_ratio=None, kv_ratio=0.5)
