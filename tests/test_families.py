"""The adapter table: every tiny family is in it, decoder blocks are found, and what it does not cover is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

import asvd_passes as ap
from asvd_passes.families import UnsupportedModelError, decoder_blocks, family_of
from asvd_passes.kv import LatentKVAttention, find_attention_layers

from conftest import SLIDING_WINDOW, VOCAB, make_tiny_model, tiny_config

BLOCKS = {"opt": "model.decoder.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}
TABLE_NAME = {"llama3": "llama"}


def kv_compress(model, tokens, save_dir=None, **config):
    config = ap.ASVDConfig(seqlen=16, calib_samples=4, method="whiten", kv_allocation="uniform", **config)
    return ap.ASVDCompressor(model).compress(config, calibration=tokens(4, 16, seed=9), save_dir=save_dir, progress=False)


def test_every_family_is_in_the_table(family, tiny_model):
    model = tiny_model(family)
    assert family_of(model).name == TABLE_NAME.get(family, family)
    path, blocks = decoder_blocks(model)
    assert path == BLOCKS.get(family, "model.layers") and len(blocks) == 2 and blocks is model.get_submodule(path)
    assert ap.decoder_blocks(model)[1] is blocks


def test_a_latent_model_keeps_its_family_and_blocks(tiny_model, tokens):
    for family in ("gpt_neox", "gemma3"):
        model = tiny_model(family)
        before = family_of(model), decoder_blocks(model)
        kv_compress(model, tokens, param_ratio=None, kv_ratio=0.5)
        assert isinstance(before[1][1][0].get_submodule(before[0].attention), LatentKVAttention)
        assert family_of(model) is before[0] and decoder_blocks(model)[0] == before[1][0]


def test_decoder_blocks_fall_back_to_the_layer_list_for_unknown_models():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gptj", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4))
    path, blocks = decoder_blocks(model)
    assert path == "transformer.h" and len(blocks) == 2


def _with(family: str, **changes):
    config = tiny_config(family)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family, changes, message", [
    ("llama", dict(attn_logit_softcapping=0.5), r"LlamaAttention \(family 'llama'\): attention logit softcapping"),
    ("gemma3", dict(attn_logit_softcapping=0.5), r"Gemma3Attention \(family 'gemma3'\): attention logit softcapping"),
    ("llama", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
     r"LlamaAttention \(family 'llama'\): RoPE type 'dynamic'"),
    ("gpt2", dict(reorder_and_upcast_attn=True), r"GPT2Attention \(family 'gpt2'\): reordered, upcast attention"),
    ("llama", dict(sliding_window=8), r"LlamaAttention \(family 'llama'\): a sliding window"),
])
def test_unsupported_feature_is_refused_before_any_work(family, changes, message, tokens, tmp_path):
    model = _with(family, **changes)
    with pytest.raises(UnsupportedModelError, match=message) as error:
        kv_compress(model, tokens, tmp_path / "out", param_ratio=None, kv_ratio=0.5)
    assert "Weight-only compression" in str(error.value) and "--kv-ratio" in str(error.value)
    assert not (tmp_path / "out").exists()
    assert not any(isinstance(m, (ap.LowRankLinear, LatentKVAttention)) for m in model.modules())
    if "rope_parameters" in changes:
        return  # torch.export cannot trace dynamic RoPE's data-dependent branch (a tracing limit, not this check)
    # Weight-only compression of the Linear projections needs no attention knowledge: it still runs.
    report = kv_compress(model, tokens, param_ratio=0.8)
    assert report.ranks and any(isinstance(m, ap.LowRankLinear) for m in model.modules())


def test_unknown_attention_class_is_refused(tokens):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gptj", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4)).eval()
    with pytest.raises(UnsupportedModelError, match=r"Attention class GPTJAttention \(model type 'gptj'\) is not in the family table"):
        find_attention_layers(model)
    with pytest.raises(UnsupportedModelError, match="GPTJAttention.*Weight-only compression"):
        kv_compress(model, tokens, param_ratio=None, kv_ratio=0.5)
    # Weight-only compression runs, and inspect reports its ranks with no KV ratio.
    from asvd_passes.inspect_model import inspect_model

    kv_compress(model, tokens, param_ratio=0.8)
    info = inspect_model(model)
    assert info["ranks"] and info["kv_ratio"] is None and info["dense_kv_bytes_per_token"] is None
    from exporters import export_onnx

    with pytest.raises(UnsupportedModelError, match="GPTJAttention.*The ONNX export"):
        export_onnx(model, "/nonexistent/never-written")


def test_windows_and_softcapping_change_the_dense_logits(tokens):
    """So the exactness tests of the matrix exercise them: the sliding window and softcapping bite."""
    ids = tokens(2, 24, seed=1)
    for family, changes in [("mistral", dict(sliding_window=None)), ("gemma2", dict(sliding_window=4096)),
                            ("gemma2", dict(attn_logit_softcapping=None)), ("gemma3", dict(sliding_window=4096))]:
        model, changed = make_tiny_model(family), _with(family, **changes)
        changed.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (model(input_ids=ids).logits - changed(input_ids=ids).logits).abs().max() > 0.05, (family, changes)
    assert ids.shape[1] > SLIDING_WINDOW


def test_issue_gemma2_full_rank_latent_reloads_exactly(tokens, tmp_path):
    """Issue 10's case: Gemma 2 with hidden 64, softcapping 0.5, window 8, 24 tokens; a full-rank latent, saved and reloaded."""
    def make():
        torch.manual_seed(0)
        config = AutoConfig.for_model(
            "gemma2", vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.2, attn_logit_softcapping=0.5, sliding_window=8,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return AutoModelForCausalLM.from_config(config).eval()

    dense, model = make(), make()
    kv_compress(model, tokens, tmp_path / "out", param_ratio=None, kv_ratio=1.0)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = tokens(2, 24, seed=1)
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-4)
        out = loaded(input_ids=ids[:, :8], past_key_values=DynamicCache(config=loaded.config), use_cache=True)
        steps = [out.logits]
        for t in range(8, 24):
            out = loaded(input_ids=ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=0, atol=1e-4)


def test_llama3_rope_scaling_changes_the_frequencies_it_rotates_with(tiny_model):
    """The llama3 family of the matrix really runs scaled RoPE (else its exactness test would prove nothing new)."""
    scaled, plain = tiny_model("llama3"), tiny_model("llama")
    assert scaled.config.rope_parameters["rope_type"] == "llama3"
    assert not torch.allclose(scaled.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)


def test_gpt_neox_latent_query_is_the_interleaved_query_rows(tiny_model, tokens):
    """GPT-NeoX's fused projection is per head [q_h | k_h | v_h]: the latent attention's q_proj holds the q_h rows."""
    dense, model = tiny_model("gpt_neox"), tiny_model("gpt_neox")
    kv_compress(model, tokens, param_ratio=None, kv_ratio=0.5)
    fused = dense.gpt_neox.layers[0].attention.query_key_value
    d = 8
    query = model.gpt_neox.layers[0].attention.q_proj
    per_head = fused.weight.view(4, 3, d, -1)[:, 0].reshape(-1, fused.in_features)
    assert torch.equal(query.weight, per_head) and torch.equal(query.bias, fused.bias.view(4, 3, d)[:, 0].reshape(-1))


@pytest.mark.parametrize("rope", [
    dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16),
])
def test_other_static_rope_scalings_are_exact_with_a_full_rank_latent(rope, tokens):
    """The table accepts the static RoPE types besides llama3; a full-rank latent reproduces prefill + decode."""
    dense, model = _with("llama", rope_parameters=rope), _with("llama", rope_parameters=rope)
    kv_compress(model, tokens, param_ratio=None, kv_ratio=1.0)
    ids = tokens(2, 24, seed=1)
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
        out = model(input_ids=ids[:, :8], use_cache=True)
        steps = [out.logits]
        for t in range(8, 24):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=0, atol=1e-4)
