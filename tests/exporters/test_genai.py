"""onnxruntime-genai runs our ``--genai`` exports (tiny models of every family): logits, greedy tokens, cache layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import asvd_passes as ap
from exporters import GenAICausalLM, ORTCausalLM, export_onnx
from exporters.onnx_export import GENAI_CONFIG_FILE, METADATA_FILE, packed_width

pytest.importorskip("onnxruntime_genai")  # a dependency of the package: present wherever it is installed

DECODE_STEPS = 12


@pytest.fixture(scope="module")
def genai_exported(tmp_path_factory, compressed_tiny):
    """``genai_exported(family, kv=True)`` → (PyTorch model, export folder), once per family per module (the
    compressed model is the session's, shared with tests/exporters/test_onnx_runtime.py)."""
    from conftest import make_tiny_model

    done = {}

    def get(family, kv=True):
        if (family, kv) not in done:
            if kv:
                model, _ = compressed_tiny(family, calibration=(4, 16, 9), method="whiten", seqlen=16,
                                           calib_samples=4, param_ratio=0.8, kv_ratio=0.5)
            else:
                model = make_tiny_model(family)
            folder = tmp_path_factory.mktemp(f"{family}-{'latent' if kv else 'dense'}") / "onnx"
            export_onnx(model, folder, layout="genai")
            done[(family, kv)] = (model, folder)
        return done[(family, kv)]

    return get


def test_genai_logits_match_pytorch_for_prefill_and_decode(family, genai_exported, tokens):
    model, folder = genai_exported(family)
    ids = tokens(2, 6 + DECODE_STEPS, seed=1)
    got = GenAICausalLM(folder).step_logits(ids.numpy(), prefill=6)
    with torch.no_grad():
        expected = model(ids).logits[:, 5:].numpy()  # the last prefill position, then each decoded one
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4


def test_genai_greedy_tokens_equal_ours_and_pytorch(family, genai_exported, tokens):
    model, folder = genai_exported(family)
    prompt = tokens(1, 5, seed=2)
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                              pad_token_id=0).numpy()
    genai = GenAICausalLM(folder).generate(prompt.numpy(), max_new_tokens=32)
    ours = ORTCausalLM(folder, threads=1).generate(prompt.numpy(), max_new_tokens=32)
    assert np.array_equal(genai, expected)
    assert np.array_equal(ours, expected)


def test_packed_latent_slots_hold_exactly_the_latent_bytes(genai_exported, tokens):
    """K and V latents of a layer share two equal-width 4-D slots: Σ widths = r_k + r_v (+1 when odd)."""
    model, folder = genai_exported("llama")
    meta = json.loads((folder / METADATA_FILE).read_text())
    assert meta["layout"] == "genai" and meta["kind"] == "latent"
    runtime = ORTCausalLM(folder, threads=1)
    ids = tokens(2, 7, seed=3).numpy()
    _, present = runtime.forward(ids, np.ones_like(ids), np.tile(np.arange(7), (2, 1)), runtime.empty_cache(2))
    for layer, attention in enumerate(m for m in model.modules() if isinstance(m, ap.kv.LatentKVAttention)):
        r_k, r_v = attention.k_proj.latent_width, attention.v_proj.latent_width
        width = packed_width(r_k, r_v)
        assert 2 * width - (r_k + r_v) in (0, 1)
        assert meta["packing"][str(layer)] == {"key": r_k, "value": r_v, "width": width}
        key, value = present[2 * layer], present[2 * layer + 1]
        assert key.shape == value.shape == (2, 1, 7, width)
        # The slots are the latents themselves: [k | v | 0?] cut in two halves.
        with torch.no_grad():
            hidden = None

            def grab(_module, args, _kwargs=None):
                nonlocal hidden
                hidden = args[0]

            handle = attention.k_proj.register_forward_pre_hook(grab)
            model(torch.from_numpy(ids))
            handle.remove()
            latents = torch.cat([attention.k_proj(hidden), attention.v_proj(hidden)], dim=-1).numpy()
        joined = np.concatenate([key[:, 0], value[:, 0]], axis=-1)
        assert np.abs(joined[..., : r_k + r_v] - latents).max() <= 1e-5
        assert not joined[..., r_k + r_v :].any()


def test_genai_config_describes_the_graph(genai_exported):
    import onnx

    _, folder = genai_exported("qwen3")
    config = json.loads((folder / GENAI_CONFIG_FILE).read_text())
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "decoder" and decoder["filename"] == "model.onnx"
    assert decoder["num_key_value_heads"] == 1  # one packed latent "head" per slot
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    names = {value.name for value in graph.input} | {value.name for value in graph.output}
    for layer in range(decoder["num_hidden_layers"]):
        for pattern in (*decoder["inputs"].values(), *decoder["outputs"].values()):
            assert (pattern % layer if "%d" in pattern else pattern) in names
    assert config["search"]["past_present_share_buffer"] is False


def test_dense_export_runs_in_genai(genai_exported, tokens):
    model, folder = genai_exported("mistral", kv=False)
    assert json.loads((folder / GENAI_CONFIG_FILE).read_text())["model"]["decoder"]["num_key_value_heads"] == 2
    ids = tokens(1, 10, seed=5)
    with torch.no_grad():
        expected = model(ids).logits[:, 3:].numpy()
    assert np.abs(GenAICausalLM(folder).step_logits(ids.numpy(), prefill=4) - expected).max() <= 1e-4


def test_cli_generate_runtime_genai_equals_ort(genai_exported, tmp_path, capsys):
    """``asvd generate --runtime genai`` and ``--runtime ort`` print the same text (real tokenizer: SmolLM2's)."""
    from transformers import AutoTokenizer

    from asvd_passes.cli import main
    from asvd_passes.models import embedded_model_dir

    _, folder = genai_exported("llama")
    try:
        tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    except FileNotFoundError as err:
        pytest.skip(str(err))
    tokenizer.save_pretrained(folder)  # ids above the tiny vocabulary never occur: the prompt is re-tokenized
    outputs = {}
    for runtime in ("ort", "genai"):
        assert main(["generate", str(folder), "--prompt", "a", "--greedy", "--max-new-tokens", "8",
                     "--runtime", runtime]) == 0
        outputs[runtime] = capsys.readouterr().out
    assert outputs["ort"] == outputs["genai"] and outputs["ort"].strip()


def test_genai_runtime_on_a_plain_export_is_a_clear_error(tiny_model, tmp_path):
    export_onnx(tiny_model("llama"), tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="genai_config.json.*--genai"):
        GenAICausalLM(tmp_path / "plain")
