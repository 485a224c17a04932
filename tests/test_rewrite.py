"""The low-rank rewrite, per family: exactness at full rank, graph vs module swap, masks, generate, dtypes."""

from __future__ import annotations

import pytest
import torch

import asvd_passes as ap
from asvd_passes.graph import LowRankRewritePass, capture, find_projections
from asvd_passes.graph.passes import LOWRANK_PREFIX

METHODS = [
    pytest.param(dict(method="svd"), id="svd"),
    pytest.param(dict(method="asvd"), id="asvd"),
    pytest.param(dict(method="asvd", asvd_statistic="abs_max", alpha=1.0), id="asvd-absmax"),
    pytest.param(dict(method="whiten"), id="whiten"),
]
CALIB_SAMPLES, CALIB_SEQLEN = 4, 32  # 128 tokens: full-rank Gram matrices for every input width (≤ 64)


def compress(model, calibration, **config):
    config.setdefault("method", "whiten")
    config.setdefault("allocation", "uniform")  # these tests are about the rewrite, not rank allocation
    return ap.ASVDCompressor(model).compress(ap.ASVDConfig(**config), calibration=calibration, progress=False)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


@pytest.fixture
def compressed(family, tiny_model, tokens):
    """A lossy (param_ratio 0.6, whiten) compressed model of ``family``."""
    model = tiny_model(family)
    compress(model, tokens(CALIB_SAMPLES, CALIB_SEQLEN), param_ratio=0.6)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_full_rank_reproduces_logits(family, method, tiny_model, tokens, projections_of):
    model = tiny_model(family)
    ids = tokens(2, 16, seed=1)
    reference = logits(model, ids)
    full = {name: min(shape) for name, shape in projections_of(model).items()}
    report = compress(
        model,
        tokens(CALIB_SAMPLES, CALIB_SEQLEN),
        **method,
        param_ratio=None,
        ranks=full,
        include_lm_head=True,
    )
    assert report.ranks == full
    swapped = {name: m for name, m in model.named_modules() if isinstance(m, ap.LowRankLinear)}
    assert set(swapped) == set(full)
    assert all(m.rank == full[name] for name, m in swapped.items())
    torch.testing.assert_close(logits(model, ids), reference, rtol=0, atol=1e-4)


def test_graph_rewrite_matches_module_swap(family, tiny_model, tokens):
    model = tiny_model(family)
    ids = tokens(1, 16, seed=1)
    dense = logits(model, ids)
    graph_module = capture(model, ids)
    projections = find_projections(graph_module, model)
    report = compress(model, tokens(CALIB_SAMPLES, CALIB_SEQLEN), param_ratio=0.6)
    factored = {name for name, rank in report.ranks.items() if rank is not None}
    assert factored, "param_ratio 0.6 should factor some projections"
    replacements = {name: model.get_submodule(name) for name in factored}
    assert all(isinstance(m, ap.LowRankLinear) for m in replacements.values())

    result = LowRankRewritePass(projections, replacements)(graph_module)
    assert result.modified
    rewritten = result.graph_module
    targets = [n.target for n in rewritten.graph.nodes if n.op == "call_module"]
    assert sorted(t for t in targets if t.startswith(LOWRANK_PREFIX)) == sorted(
        LOWRANK_PREFIX + name.replace(".", "__") for name in factored
    )
    # The factored projections no longer appear as dense matmuls in the graph.
    assert {p.name for p in find_projections(rewritten, model)} == {"lm_head"}

    with torch.no_grad():
        graph_logits = rewritten(input_ids=ids, use_cache=False).logits
    swapped_logits = logits(model, ids, use_cache=False)
    torch.testing.assert_close(graph_logits, swapped_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(graph_logits, dense, atol=1e-4), "the rewrite should change a lossy model's output"


def test_padded_batch_matches_single_rows(family, compressed, tokens):
    model = compressed
    lengths = (12, 7)
    rows = [tokens(1, n, seed=2 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    pad = model.config.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):  # left padding
        ids[i, width - row.numel() :] = row
        mask[i, width - row.numel() :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    batched = logits(model, ids, attention_mask=mask, position_ids=positions)
    for i, row in enumerate(rows):
        single = logits(model, row[None])[0]
        torch.testing.assert_close(batched[i, width - row.numel() :], single, rtol=1e-4, atol=1e-4)


def test_generate_matches_greedy_without_cache(family, compressed, tokens):
    model = compressed
    prompt = tokens(1, 5, seed=3)
    steps = 6
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=model.config.pad_token_id,
    )
    assert out.shape == (1, prompt.shape[1] + steps)
    expected = prompt
    for _ in range(steps):  # recompute the whole sequence each step: no KV cache involved
        following = logits(model, expected, use_cache=False)[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, following], dim=1)
    assert torch.equal(out, expected)


def test_full_rank_generate_matches_dense(tiny_model, tokens, projections_of):
    model, dense = tiny_model("mistral"), tiny_model("mistral")
    full = {name: min(shape) for name, shape in projections_of(model).items() if name != "lm_head"}
    compress(model, tokens(CALIB_SAMPLES, CALIB_SEQLEN), method="svd", param_ratio=None, ranks=full)
    prompt = tokens(2, 4, seed=4)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), dense.generate(prompt, **kwargs))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_after_compression(family, dtype, tiny_model, tokens):
    model = tiny_model(family)
    ids = tokens(2, 16, seed=5)
    compress(model, tokens(CALIB_SAMPLES, CALIB_SEQLEN), param_ratio=0.6)
    reference = logits(model, ids)
    half = logits(model.to(dtype), ids)
    assert half.dtype == dtype
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), reference, rtol=0, atol=0.05 * reference.abs().max().item())


@pytest.mark.parametrize("family", ["qwen3", "opt"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compress_half_precision_model(family, dtype, tiny_model, tokens):
    model = tiny_model(family, dtype=dtype)
    ids = tokens(2, 16, seed=5)
    report = compress(model, tokens(CALIB_SAMPLES, CALIB_SEQLEN), param_ratio=0.6)
    lowrank = [m for m in model.modules() if isinstance(m, ap.LowRankLinear)]
    assert len(lowrank) == sum(r is not None for r in report.ranks.values()) > 0
    assert all(p.dtype == dtype for m in lowrank for p in m.parameters())
    out = logits(model, ids)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # Same compression in fp32 from the same weights: the half model tracks it.
    reference_model = tiny_model(family)
    compress(reference_model, tokens(CALIB_SAMPLES, CALIB_SEQLEN), param_ratio=0.6)
    reference = logits(reference_model, ids)
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=0.05 * reference.abs().max().item())


def test_lowrank_weight_is_the_dense_product():
    torch.manual_seed(0)
    down, up, bias = torch.randn(3, 8), torch.randn(5, 3), torch.randn(5)
    module = ap.LowRankLinear.from_factors(down, up, bias, dtype=torch.float32, device="cpu")
    assert module.weight.shape == (5, 8)
    assert torch.equal(module.weight, up @ down)
    assert not module.weight.requires_grad
    x = torch.randn(4, 8)
    torch.testing.assert_close(module(x), x @ module.weight.T + bias)
    assert "weight" not in dict(module.named_parameters()), "only the factors are parameters"


def test_whitening_minimises_the_layer_error_on_calibration(tiny_model, tokens):
    """SVD-LLM's guarantee: on the calibration inputs X, whitened truncation gives the smallest ‖X(W−Ŵ)ᵀ‖."""
    name, rank = "model.layers.0.mlp.down_proj", 8
    calibration = tokens(CALIB_SAMPLES, CALIB_SEQLEN)
    dense = tiny_model("qwen2")
    weight = dense.get_submodule(name).weight.detach().double()
    inputs = []
    handle = dense.get_submodule(name).register_forward_pre_hook(lambda m, args: inputs.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        for row in calibration:
            dense(input_ids=row[None], use_cache=False)
    handle.remove()
    x = torch.cat(inputs).double()

    errors = {}
    for label, options in [("svd", {}), ("asvd", {}), ("whiten", {})]:
        model = tiny_model("qwen2")
        compress(model, calibration, method=label, param_ratio=None, ranks={name: rank}, **options)
        approx = model.get_submodule(name).weight.double()
        errors[label] = torch.linalg.matrix_norm(x @ (weight - approx).T).item()
    assert errors["whiten"] <= errors["svd"] * (1 + 1e-5), errors
    assert errors["whiten"] <= errors["asvd"] * (1 + 1e-5), errors
    assert errors["whiten"] < errors["svd"] * 0.99, "whitening should measurably beat plain SVD here"
