"""Latent KV attention on tiny models of every family: exactness at full rank, cache bytes, padding, sampling, dtypes."""

from __future__ import annotations

import pytest
import torch

import asvd_passes as ap
from asvd_passes.kv import LatentKVAttention, cache_nbytes

CALIB = dict(seqlen=16, calib_samples=4)


@pytest.fixture
def latent(compressed_tiny):
    """``latent(family, **config)`` → ``(model, report)``: a fresh copy of the tiny ``family`` model with latent
    KV attention (whiten, uniform KV allocation, weights dense unless asked), compressed once per session."""
    def build(family: str, **config):
        config.setdefault("method", "whiten")
        config.setdefault("param_ratio", None)
        config.setdefault("kv_allocation", "uniform")
        return compressed_tiny(family, calibration=(4, 16, 9), **CALIB, **config)
    return build


def prefill_and_decode(model, ids, prefill: int, cache=None):
    """Logits of a prefill of ``prefill`` tokens, then one decode step per remaining token."""
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    return torch.cat(steps, dim=1), cache


@pytest.mark.parametrize("group_size", [None, 1])
def test_full_rank_latent_reproduces_dense(family, group_size, latent, tiny_model, tokens):
    dense = tiny_model(family)
    model, report = latent(family, kv_ratio=1.0, kv_group_size=group_size)
    assert report.kv["kv_ratio"] == 1.0
    assert any(isinstance(m, LatentKVAttention) for m in model.modules())
    ids = tokens(2, 24, seed=1)
    expected, _ = prefill_and_decode(dense, ids, prefill=8)
    got, cache = prefill_and_decode(model, ids, prefill=8)  # 16 decode steps, the model's own DynamicCache
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # The cache held latents only: (batch, 1, tokens, width) per layer; a sliding layer the last window - 1.
    windows = 0
    for layer in cache.layers:
        held = layer.sliding_window - 1 if getattr(layer, "is_sliding", False) else 24
        windows += held < 24
        assert layer.keys.shape[:3] == (2, 1, held) and layer.values.shape[:3] == (2, 1, held)
    if family in ("mistral", "gemma2", "gemma3"):  # the window is shorter than the sequence: it was exercised
        assert windows


def test_cache_bytes_are_exactly_the_latents(family, latent, tokens):
    model, report = latent(family, kv_ratio=0.5, kv_allocation="fisher")
    ranks = report.kv["layers"]
    batch, length = 3, 11
    _, cache = prefill_and_decode(model, tokens(batch, length, seed=2), prefill=6)
    widths = sum(sum(r["key"]) + sum(r["value"]) for r in ranks.values())
    attentions = [m for m in model.modules() if isinstance(m, LatentKVAttention)]
    # A sliding-window layer keeps the last window - 1 tokens (the window, 8, is shorter than the 11 tokens).
    held = {a.layer_idx: min(length, a.sliding_window - 1) if a.sliding_window else length for a in attentions}
    assert cache_nbytes(cache) == batch * 4 * sum(
        held[a.layer_idx] * (a.k_proj.latent_width + a.v_proj.latent_width) for a in attentions)
    for attention in attentions:  # nothing of full width is kept across steps
        layer = cache.layers[attention.layer_idx]
        assert layer.keys.shape[-1] == attention.k_proj.latent_width < attention.layout.kv_width * 2
        assert layer.values.shape[-1] == attention.v_proj.latent_width
    # K and V count separately and exactly: the achieved ratio is Σ latent widths / Σ dense widths.
    dense_width = sum(2 * a.layout.kv_width for a in attentions)
    assert report.kv["kv_ratio"] == widths / dense_width <= 0.5


def test_generate_uses_latent_cache_by_default(latent, tokens):
    model, _ = latent("llama", kv_ratio=0.5)
    prompt = tokens(1, 5, seed=3)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, min_new_tokens=4,
                         do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    latent = sum(sum(r["key"]) + sum(r["value"]) for r in model.config.quantization_config.kv["layers"].values())
    assert cache_nbytes(out.past_key_values) == (5 + 4 - 1) * latent * 4  # the last token is never fed back


def test_greedy_generate_matches_recompute_without_cache(family, latent, tokens):
    model, _ = latent(family, kv_ratio=0.5, kv_group_size=1)
    prompt = tokens(1, 5, seed=3)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
                         do_sample=False, pad_token_id=0)
    expected = prompt
    for _ in range(6):
        with torch.no_grad():
            following = model(input_ids=expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, following], dim=1)
    assert torch.equal(out, expected)


def test_left_padded_batch_equals_unpadded(family, latent, tokens):
    model, _ = latent(family, kv_ratio=0.5)
    rows = [tokens(1, n, seed=4 + i)[0] for i, n in enumerate((9, 5))]
    width = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - row.numel():] = row
        mask[i, width - row.numel():] = 1
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    for i, row in enumerate(rows):
        single = model.generate(row[None], attention_mask=torch.ones_like(row[None]), **kwargs)
        assert torch.equal(batched.sequences[i, width:], single.sequences[0, row.numel():])
        for step_batched, step_single in zip(batched.scores, single.scores):
            torch.testing.assert_close(step_batched[i], step_single[0], rtol=1e-4, atol=1e-4)


def test_seeded_sampling_is_reproducible(latent, tokens):
    model, _ = latent("qwen3", kv_ratio=0.5)
    prompt = tokens(2, 4, seed=5)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=True, top_k=0, pad_token_id=0)
    torch.manual_seed(7)
    first = model.generate(prompt, **kwargs)
    torch.manual_seed(7)
    second = model.generate(prompt, **kwargs)
    assert torch.equal(first, second)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_latent_cache(family, dtype, latent, tokens):
    reference, _ = latent(family, kv_ratio=0.5)
    model, _ = latent(family, kv_ratio=0.5)
    model = model.to(dtype)
    ids = tokens(2, 10, seed=6)
    got, cache = prefill_and_decode(model, ids, prefill=6)
    expected, _ = prefill_and_decode(reference, ids, prefill=6)
    assert got.dtype == dtype and all(layer.keys.dtype == dtype for layer in cache.layers)
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=0.1)


@pytest.mark.parametrize("group_size", [None, 1])
def test_folding_value_up_into_the_output_changes_nothing(family, group_size, latent, tokens, monkeypatch):
    model, _ = latent(family, kv_ratio=0.5, kv_group_size=group_size)
    ids = tokens(2, 14, seed=8)
    results = {}
    for policy in ("never", "always"):
        monkeypatch.setattr(LatentKVAttention, "fold_policy", policy)
        results[policy], _ = prefill_and_decode(model, ids, prefill=8)
    torch.testing.assert_close(results["always"], results["never"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("group_size", [None, 1])
def test_value_up_as_one_2d_linear_equals_the_per_head_einsum(family, group_size, latent, tokens, monkeypatch):
    """The quantizable V up of int8/int4 exports (one 2-D linear, then each head's own block) changes nothing."""
    model, _ = latent(family, kv_ratio=0.5, kv_group_size=group_size)
    monkeypatch.setattr(LatentKVAttention, "fold_policy", "always")
    ids = tokens(2, 14, seed=8)
    results = {}
    for linear in (False, True):
        monkeypatch.setattr(LatentKVAttention, "value_up_as_linear", linear)
        results[linear], _ = prefill_and_decode(model, ids, prefill=8)
    torch.testing.assert_close(results[True], results[False], rtol=0, atol=1e-5)


def test_fold_is_chosen_for_decoding_not_for_long_prefill(latent):
    model, _ = latent("llama", kv_ratio=0.5)
    attention = next(m for m in model.modules() if isinstance(m, LatentKVAttention))
    assert attention.fold_value(steps=1, total=512)
    assert not attention.fold_value(steps=512, total=512)


# -- K absorption (families without RoPE or a K norm: GPT-2, OPT) ------------------------------------

ABSORBING = ("gpt2", "opt")


def count_key_rebuilds(model, monkeypatch) -> list:
    """Patch every latent K projection's ``rebuild`` to record its calls (it still rebuilds)."""
    calls = []
    for attention in (m for m in model.modules() if isinstance(m, LatentKVAttention)):
        rebuild = attention.k_proj.rebuild
        monkeypatch.setattr(attention.k_proj, "rebuild", lambda latent, rebuild=rebuild: calls.append(1) or rebuild(latent))
    return calls


def test_only_families_without_rope_or_key_norm_absorb(family, latent):
    model, _ = latent(family, kv_ratio=0.5)
    attentions = [m for m in model.modules() if isinstance(m, LatentKVAttention)]
    assert attentions and all(a.can_absorb_key() == (family in ABSORBING) for a in attentions)


@pytest.mark.parametrize("family", ABSORBING)
@pytest.mark.parametrize("group_size", [None, 1])
def test_absorbed_key_reproduces_dense_at_full_rank(family, group_size, latent, tiny_model, tokens, monkeypatch):
    dense = tiny_model(family)
    model, _ = latent(family, kv_ratio=1.0, kv_group_size=group_size)
    monkeypatch.setattr(LatentKVAttention, "absorb_policy", "always")
    rebuilds = count_key_rebuilds(model, monkeypatch)
    ids = tokens(2, 24, seed=1)
    expected, _ = prefill_and_decode(dense, ids, prefill=8)
    got, _ = prefill_and_decode(model, ids, prefill=8)
    assert not rebuilds  # scores were computed on the K latent: no key was rebuilt, prefill or decode
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ABSORBING)
@pytest.mark.parametrize("group_size", [None, 1])
@pytest.mark.parametrize("fold", ["always", "never"])
def test_absorbing_key_changes_nothing_at_low_rank(family, group_size, fold, latent, tokens, monkeypatch):
    model, _ = latent(family, kv_ratio=0.5, kv_group_size=group_size)
    monkeypatch.setattr(LatentKVAttention, "fold_policy", fold)
    ids = tokens(2, 14, seed=8)
    results = {}
    for policy in ("never", "always"):
        monkeypatch.setattr(LatentKVAttention, "absorb_policy", policy)
        rebuilds = count_key_rebuilds(model, monkeypatch)
        results[policy], _ = prefill_and_decode(model, ids, prefill=8)
        assert bool(rebuilds) == (policy == "never")
    torch.testing.assert_close(results["always"], results["never"], rtol=0, atol=1e-5)


def test_absorption_is_chosen_for_decoding_and_by_cost_for_prefill(latent):
    model, _ = latent("gpt2", kv_ratio=0.5)  # one head group: the latent is wider than a head
    attention = next(m for m in model.modules() if isinstance(m, LatentKVAttention))
    assert attention.k_proj.ranks[0] > attention.head_dim
    assert attention.absorb_key(steps=1, total=512)
    assert not attention.absorb_key(steps=512, total=512)
    llama, _ = latent("llama", kv_ratio=0.5)
    assert not next(m for m in llama.modules() if isinstance(m, LatentKVAttention)).absorb_key(steps=1, total=512)
