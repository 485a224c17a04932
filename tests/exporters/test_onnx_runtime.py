"""ONNX export + ONNX Runtime on tiny models of every family: logits, greedy generation, latent widths, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import asvd_passes as ap
from exporters import ORTCausalLM, ORTInputError, export_onnx
from exporters.onnx_export import METADATA_FILE, MODEL_FILE

DECODE_STEPS = 20


def compressed(family, tokens_fn, **config):
    from conftest import make_tiny_model

    model = make_tiny_model(family)
    config = ap.ASVDConfig(method="whiten", seqlen=16, calib_samples=4, **config)
    ap.ASVDCompressor(model).compress(config, calibration=tokens_fn(4, 16, seed=9), progress=False)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, compressed_tiny):
    """``exported(family)`` → (PyTorch model, ORT runtime), exported once per family per module (the compressed
    model is the session's, shared with tests/exporters/test_genai.py)."""
    done = {}

    def get(family):
        if family not in done:
            model, _ = compressed_tiny(family, calibration=(4, 16, 9), method="whiten", seqlen=16, calib_samples=4,
                                       param_ratio=0.8, kv_ratio=0.5)
            folder = tmp_path_factory.mktemp(family) / "onnx"
            export_onnx(model, folder)
            done[family] = (model, ORTCausalLM(folder, threads=1), folder)
        return done[family]

    return get


def test_ort_logits_match_pytorch_for_prefill_and_decode(family, exported, tokens, step_logits):
    model, runtime, _ = exported(family)
    torch_steps, ort_steps = step_logits
    batch, prefill = 2, 6
    ids = tokens(batch, prefill + DECODE_STEPS, seed=1)
    got, past = ort_steps(runtime, ids, prefill)
    assert np.abs(got - torch_steps(model, ids, prefill)).max() <= 1e-4
    # The latents ORT returns have exactly the widths written in the metadata.
    meta = json.loads((exported(family)[2] / METADATA_FILE).read_text())
    assert meta["kind"] == "latent"
    for entry, tensor in zip(meta["cache"], past):
        assert tensor.shape == (batch, ids.shape[1], entry["fixed"]["width"])
    ranks = meta["kv_ranks"]
    widths = [sum(ranks[name][role]) for name in sorted(ranks, key=lambda n: int(n.split(".")[-2])) for role in ("key", "value")]
    assert widths == [entry["fixed"]["width"] for entry in meta["cache"]]


def test_greedy_generation_is_identical_to_pytorch(family, exported, tokens):
    model, runtime, _ = exported(family)
    prompt = tokens(1, 5, seed=2)
    # Both stop at the model's EOS (a random model may emit it); min_new_tokens would mask EOS in PyTorch only.
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                              pad_token_id=0)
    got = runtime.generate(prompt.numpy(), max_new_tokens=32)
    assert np.array_equal(got, expected.numpy())


def test_left_padded_batch_and_seeded_sampling(exported, tokens):
    model, runtime, _ = exported("llama")
    rows = [tokens(1, n, seed=4 + i)[0].numpy() for i, n in enumerate((7, 4))]
    ids = np.zeros((2, 7), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, 7 - row.size:], mask[i, 7 - row.size:] = row, 1
    batched = runtime.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    for i, row in enumerate(rows):
        single = runtime.generate(row[None], max_new_tokens=8, eos_token_id=[])
        assert np.array_equal(batched[i, 7:], single[0, row.size:])
    first = runtime.generate(ids, mask, max_new_tokens=8, do_sample=True, seed=3, eos_token_id=[])
    again = runtime.generate(ids, mask, max_new_tokens=8, do_sample=True, seed=3, eos_token_id=[])
    assert np.array_equal(first, again)
    streamed = []
    runtime.generate(rows[0][None], max_new_tokens=3, eos_token_id=[], streamer=lambda t: streamed.append(int(t[0])))
    assert len(streamed) == 3


def test_eos_stops_generation(exported, tokens):
    _, runtime, _ = exported("llama")
    prompt = tokens(1, 5, seed=2).numpy()
    full = runtime.generate(prompt, max_new_tokens=6, eos_token_id=[])
    stop = int(full[0, 6])  # the second generated token, declared EOS: generation ends where it first appears
    first = 5 + list(full[0, 5:]).index(stop)
    assert runtime.generate(prompt, max_new_tokens=6, eos_token_id=stop).shape[1] == first + 1


def test_graph_checks_and_visible_low_rank_matmuls(exported):
    _, _, folder = exported("llama")
    onnx.checker.check_model(str(folder / MODEL_FILE), full_check=True)
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(folder / MODEL_FILE)), strict_mode=True)
    assert "asvd_onnx" in {p.key for p in proto.metadata_props}
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("MatMul") + ops.count("Gemm") >= 2 * 2 * 2  # down and up of K and V, per layer
    assert "Attention" not in ops  # explicit masked attention, no is_causal corner case


def test_wrong_inputs_are_clear_errors(exported, tokens):
    _, runtime, _ = exported("llama")
    ids = tokens(1, 3).numpy()
    mask, positions = np.ones((1, 3), dtype=np.int64), np.arange(3)[None]
    past = runtime.empty_cache(1)
    with pytest.raises(ORTInputError, match="missing input"):
        runtime.check_inputs({"input_ids": ids, "attention_mask": mask, "position_ids": positions})
    bad = list(past)
    bad[0] = np.zeros((1, 0, bad[0].shape[2] + 1), dtype=np.float32)
    with pytest.raises(ORTInputError, match=r"past_latents\.0\.key must have shape"):
        runtime.forward(ids, mask, positions, bad)
    with pytest.raises(ORTInputError, match="attention_mask must be"):
        runtime.forward(ids, np.ones((1, 5), dtype=np.int64), positions, past)


def test_unavailable_provider_is_a_clear_error(exported):
    import onnxruntime as ort

    _, _, folder = exported("llama")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA EP present")
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider is not available"):
        ORTCausalLM(folder, provider="cuda")


def test_dense_model_exports_with_full_width_cache(tiny_model, tokens, tmp_path):
    model = tiny_model("qwen2")
    meta = export_onnx(model, tmp_path / "dense")
    assert meta.kind == "dense" and meta.inputs[3] == "past_key_values.0.key"
    runtime = ORTCausalLM(tmp_path / "dense", threads=1)
    prompt = tokens(1, 4, seed=6)
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, min_new_tokens=10,
                              do_sample=False, pad_token_id=0)
    assert np.array_equal(runtime.generate(prompt.numpy(), max_new_tokens=10, eos_token_id=[]), expected.numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_provider_matches_cpu(exported, tokens):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu not installed")
    _, cpu, folder = exported("llama")
    gpu = ORTCausalLM(folder, provider="cuda")
    prompt = tokens(1, 5, seed=2).numpy()
    assert np.array_equal(gpu.generate(prompt, max_new_tokens=16, eos_token_id=[]),
                          cpu.generate(prompt, max_new_tokens=16, eos_token_id=[]))


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_weight_only_compressed_model_exports_with_dense_cache(family, tiny_model, tokens, tmp_path, step_logits):
    """``--param-ratio`` alone (K/V projections factored, not latent): a dense-cache export that matches PyTorch."""
    model = compressed(family, tokens, param_ratio=0.8, allocation="uniform")  # every projection factored
    assert isinstance(model.get_submodule(next(n for n, _ in model.named_modules() if n.endswith(
        ("k_proj", "qkv_proj", "c_attn")))), ap.LowRankLinear)
    meta = export_onnx(model, tmp_path / "weights-only", layout="genai")
    assert meta.kind == "dense"
    torch_steps, ort_steps = step_logits
    ids = tokens(2, 10, seed=1)
    got, _ = ort_steps(ORTCausalLM(tmp_path / "weights-only", threads=1), ids, 4)
    assert np.abs(got - torch_steps(model, ids, 4)).max() <= 1e-4


def test_failed_export_gives_the_callers_model_back_unchanged(tokens, tmp_path, monkeypatch):
    """A failure half-way (model already cast to fp16, eager attention, eval mode) restores the model exactly."""
    model = compressed("llama", tokens, param_ratio=0.8, kv_ratio=0.5)
    ids = tokens(2, 9, seed=5)
    with torch.no_grad():
        before = model(ids).logits
    types = [(name, type(module)) for name, module in model.named_modules()]
    tensors = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()}
    attention = model.config._attn_implementation
    model.train()  # a mode the export changes
    seen = {}

    def failing_export(wrapper, *args, **kwargs):
        seen.update(dtype=next(wrapper.parameters()).dtype, attention=model.config._attn_implementation,
                    training=model.training)
        raise RuntimeError("export failed half-way")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(RuntimeError, match="half-way"):
        export_onnx(model, tmp_path / "out", dtype="fp16")
    assert seen == {"dtype": torch.float16, "attention": "eager", "training": False}  # it did fail mid-export
    assert not (tmp_path / "out").exists()
    assert [(name, type(module)) for name, module in model.named_modules()] == types
    assert model.config._attn_implementation == attention != "eager"
    assert all(module.training for module in model.modules())
    after = model.state_dict(keep_vars=True)
    assert after.keys() == tensors.keys()
    for name, tensor in tensors.items():
        # Float tensors are back in float32; index buffers (the interpolative factors' rows) stay integer.
        assert after[name] is tensor and after[name].dtype == (torch.float32 if tensor.is_floating_point() else torch.int32), name
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_absorbed_key_export_equals_rebuilt_key_export(family, exported, tokens, step_logits, tmp_path):
    """GPT-2/OPT exports score on the K latent by default; the rebuild-K export gives the same logits."""
    model, absorbed, folder = exported(family)
    assert json.loads((folder / METADATA_FILE).read_text())["absorb_key"] == "always"
    export_onnx(model, tmp_path / "rebuilt", absorb_key="never")
    rebuilt = ORTCausalLM(tmp_path / "rebuilt", threads=1)
    assert rebuilt.metadata.absorb_key == "never"
    ids = tokens(2, 6 + DECODE_STEPS, seed=1)
    _, ort_steps = step_logits
    got, _ = ort_steps(absorbed, ids, 6)
    expected, _ = ort_steps(rebuilt, ids, 6)
    assert np.abs(got - expected).max() <= 1e-5
    # Rebuilding K multiplies every cached latent by K's up (a MatMul per layer); absorbing maps the
    # new queries through it instead (a per-head Einsum per layer, beside V's folded up).
    def ops(path):
        counts = {}
        for node in onnx.load(str(path / MODEL_FILE)).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        return counts
    layers = model.config.num_hidden_layers
    absorbed_ops, rebuilt_ops = ops(folder), ops(tmp_path / "rebuilt")
    assert absorbed_ops["Einsum"] == rebuilt_ops["Einsum"] + layers
    assert absorbed_ops["MatMul"] + absorbed_ops.get("Gemm", 0) == rebuilt_ops["MatMul"] + rebuilt_ops.get("Gemm", 0) - layers


def test_rope_families_never_record_absorption(exported):
    _, runtime, _ = exported("llama")
    assert runtime.metadata.absorb_key == "never"
