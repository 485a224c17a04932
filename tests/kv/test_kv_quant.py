"""Quantized latent cache: codes as ONNX QuantizeLinear makes them, bytes measured from the cache,
the same logits with and without a cache, save/reload, both pipelines, rotation, bad options."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import asvd_passes as ap
from asvd_passes.inspect_model import inspect_model, measure_kv_bytes_per_token
from asvd_passes.kv import LatentKVAttention
from asvd_passes.kv.quant import LatentQuantizer, rotate_latent


def compress(model, tokens, save_dir=None, **config):
    config.setdefault("kv_allocation", "uniform")
    config = ap.ASVDConfig(method="whiten", seqlen=16, calib_samples=4, **config)
    return ap.ASVDCompressor(model).compress(config, calibration=tokens(4, 16, seed=9), save_dir=save_dir, progress=False)


@pytest.mark.parametrize("bits, width", [(8, 6), (4, 6), (4, 7)])
def test_codes_round_trip_within_half_a_step(bits, width):
    rows = torch.randn(64, width) * torch.linspace(0.1, 3.0, width) + torch.linspace(-1, 1, width)
    quantizer = LatentQuantizer(width, bits)
    quantizer.fit(rows.amin(0), rows.amax(0), None, "channel")  # no clipping: every row inside the range
    stored = quantizer.quantize(rows)
    assert stored.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert stored.shape == (64, width if bits == 8 else (width + 1) // 2)
    error = (quantizer.dequantize(stored, torch.float32) - rows).abs()
    assert (error <= quantizer.scale / 2 + 1e-6).all()
    # QuantizeLinear's definition: saturate(round_half_even(x / scale) + zero_point).
    codes = torch.clamp(torch.round(rows / quantizer.scale) + quantizer.zero_point.float(), *quantizer.code_range)
    assert torch.equal(quantizer.codes(rows), codes)


def test_four_bit_clipping_never_worse_than_the_full_range():
    rows = torch.randn(512, 4)
    rows[0] = 40.0  # one outlier token
    full, clipped = LatentQuantizer(4, 4), LatentQuantizer(4, 4)
    full.fit(rows.amin(0), rows.amax(0), None, "channel")
    clipped.fit(rows.amin(0), rows.amax(0), rows, "channel")
    error = lambda q: (q.dequantize(q.quantize(rows), torch.float32) - rows).square().sum()  # noqa: E731
    assert error(clipped) < error(full) and (clipped.scale < full.scale).all()


def test_rotation_leaves_the_float_model_unchanged(tiny_model, tokens):
    model = tiny_model("llama")
    compress(model, tokens, kv_ratio=0.5)
    ids = tokens(2, 12, seed=1)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for attention in (m for m in model.modules() if isinstance(m, LatentKVAttention)):
            rotate_latent(attention.k_proj, torch.Generator().manual_seed(0))
            rotate_latent(attention.v_proj, torch.Generator().manual_seed(1))
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family_name, pipeline, bits", [("llama", "sequential", 8), ("qwen3", "whole", 4),
                                                         ("gpt2", "sequential", 4)])
def test_quantized_cache_bytes_logits_and_reload(family_name, pipeline, bits, tiny_model, tokens, tmp_path):
    """Cache bytes = latent width · bits / 8 per token, measured from the cache; decoding with the cache gives the
    logits of one forward over the whole sequence; the saved folder reloads with the same scales and logits."""
    reference = tiny_model(family_name)
    compress(reference, tokens, kv_ratio=0.5, pipeline=pipeline)
    model = tiny_model(family_name)
    report = compress(model, tokens, tmp_path / "out", kv_ratio=0.5, kv_bits=bits, pipeline=pipeline)
    assert report.kv["bits"] == bits
    float_bytes = measure_kv_bytes_per_token(reference)
    latent = sum(m.k_proj.latent_width + m.v_proj.latent_width for m in model.modules() if isinstance(m, LatentKVAttention))
    assert float_bytes == 4 * latent
    assert measure_kv_bytes_per_token(model) == float_bytes // (4 if bits == 8 else 8)

    ids = tokens(1, 12, seed=1)
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        floating = reference(input_ids=ids).logits
        prefix = model(input_ids=ids[:, :8], use_cache=True)
        cache, steps = prefix.past_key_values, [prefix.logits]
        for t in range(8, 12):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=0, atol=1e-4)
    assert not torch.allclose(whole, floating, atol=1e-6)  # the codes are really used
    assert (whole - floating).abs().max() < (0.2 if bits == 8 else 2.0) * floating.abs().max()

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, whole, rtol=0, atol=0)
    info = inspect_model(loaded, tmp_path / "out")
    assert info["kv_bytes_per_token"] == float_bytes // (4 if bits == 8 else 8) and info["kv_bits"] == bits


def test_full_width_int8_cache(tiny_model, tokens):
    """kv_ratio 1.0 with 8 bits: the dense width, a quarter of the fp32 bytes, close to the dense model."""
    dense = tiny_model("llama")
    model = tiny_model("llama")
    compress(model, tokens, kv_ratio=1.0, kv_bits=8)
    assert measure_kv_bytes_per_token(model) == measure_kv_bytes_per_token(dense) // 4
    ids = tokens(2, 12, seed=1)
    with torch.no_grad():
        reference = dense(input_ids=ids).logits
        assert (model(input_ids=ids).logits - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("kwargs, message", [
    (dict(param_ratio=0.8, kv_bits=8), "kv_bits quantizes the latent KV cache: give a kv_ratio"),
    (dict(kv_ratio=0.5, kv_bits=3), "kv_bits must be one of 8, 4"),
    (dict(kv_ratio=0.5, kv_bits=8, kv_quant_granularity="group"), "Unknown kv_quant_granularity"),
    (dict(kv_budget=1000, kv_ratio=0.5), "kv_budget chooses the KV ratio and bits itself"),
    (dict(kv_budget=1000, kv_allocation="uniform"), "kv_budget prices ranks and bits"),
    (dict(kv_budget=-1), "kv_budget must be a positive number"),
])
def test_bad_kv_quant_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ap.ASVDConfig(**kwargs)


def test_budget_plan_meets_the_bytes_and_reloads(tiny_model, tokens, tmp_path):
    """--kv-budget: ranks and storage chosen together; the measured cache fits the budget; the folder reloads."""
    model = tiny_model("llama")  # 2 layers, K and V 16 wide each: 64 fp32 numbers = 256 bytes per token dense
    budget = 40  # an fp32 latent of 10 numbers, or 8-bit of 40 (more than half the width), or 4-bit of 78
    report = compress(model, tokens, tmp_path / "out", kv_budget=budget, kv_allocation="fisher")
    assert report.kv["bits"] in (8, 4) and report.kv["budget"] == budget
    assert measure_kv_bytes_per_token(model) <= budget
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = tokens(2, 12, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_budget_plan_prices_bits_against_ranks(tiny_model):
    from asvd_passes.kv import find_attention_layers
    from asvd_passes.kv.plan import budget_kv_plan

    layouts = find_attention_layers(tiny_model("llama"))
    # Every channel costs the same to drop: the plan keeps as many channels as the bytes allow.
    costs = {(l.name, role, 0): [float(16 - r) for r in range(17)] for l in layouts for role in ("key", "value")}
    dense_bytes = 2 * 2 * 16 * 4
    assert budget_kv_plan(layouts, costs, dense_bytes, 4, 2).bits is None  # the dense budget: float, full rank
    full_int8 = budget_kv_plan(layouts, costs, dense_bytes // 4, 4, 2)  # float would keep a quarter of the width
    assert full_int8.bits == 8 and full_int8.ratio == 1.0


def test_budget_below_the_smallest_cache_is_refused_before_any_work(tiny_model, tokens, tmp_path):
    with pytest.raises(ValueError, match="below the smallest latent cache this model can have"):
        compress(tiny_model("llama"), tokens, tmp_path / "out", kv_budget=1, kv_allocation="fisher")
    assert not (tmp_path / "out").exists()
