"""The sequential (layer-wise) pipeline on tiny models of every family."""

from __future__ import annotations

import os

import pytest
import torch

from asvd_passes import ASVDCompressor, ASVDConfig
from asvd_passes.allocation.block_cache import decoder_layers
from asvd_passes.allocation.sensitivity import output_fisher
from asvd_passes.graph import LowRankRewritePass, find_projections
from asvd_passes.kv import LatentKVAttention
from asvd_passes.modules import LowRankLinear, projection_weight
from asvd_passes.pipelines.blocks import capture_block, record_block_inputs, run_block
from asvd_passes.pipelines.memory import MemoryBudgetError
from asvd_passes.pipelines.sequential import SequentialPipeline

SMALL = dict(seqlen=16, calib_samples=4)


def _factors(model):
    return {name: (m.down.weight.detach().clone(), m.up.weight.detach().clone())
            for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


@pytest.mark.parametrize("allocation", ["uniform", "fisher"])
def test_sequential_without_sequential_calibration_gives_the_whole_path_factors(family, allocation, tiny_model, tokens):
    windows = tokens(4, 16)
    whole = ASVDCompressor(tiny_model(family))
    whole_report = whole.compress(ASVDConfig(param_ratio=0.7, allocation=allocation, pipeline="whole", **SMALL),
                                  calibration=windows, progress=False)
    layered = ASVDCompressor(tiny_model(family))
    layered_report = layered.compress(
        ASVDConfig(param_ratio=0.7, allocation=allocation, pipeline="sequential", sequential_calibration=False, **SMALL),
        calibration=windows, progress=False)
    assert layered_report.pipeline["name"] == "sequential" and whole_report.pipeline["name"] == "whole"
    assert layered_report.ranks == whole_report.ranks
    expected, got = _factors(whole.model), _factors(layered.model)
    assert expected.keys() == got.keys() and expected
    for name, (down, up) in expected.items():
        torch.testing.assert_close(got[name][0], down, rtol=0, atol=1e-6)
        torch.testing.assert_close(got[name][1], up, rtol=0, atol=1e-6)


def test_sequential_kv_without_sequential_calibration_matches_the_whole_path(family, tiny_model, tokens):
    windows, ids = tokens(4, 16), tokens(2, 16, seed=3)
    outputs = []
    for pipeline in ("whole", "sequential"):
        compressor = ASVDCompressor(tiny_model(family))
        report = compressor.compress(
            ASVDConfig(param_ratio=0.8, kv_ratio=0.5, pipeline=pipeline, sequential_calibration=False, **SMALL),
            calibration=windows, progress=False)
        assert report.kv is not None and any(isinstance(m, LatentKVAttention) for m in compressor.model.modules())
        with torch.no_grad():
            outputs.append((report.kv["layers"], compressor.model(ids).logits))
    assert outputs[0][0] == outputs[1][0]
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=0, atol=1e-4)


def test_rewritten_block_graph_gives_the_swapped_block_outputs(family, tiny_model, tokens):
    model = tiny_model(family)
    hidden, calls = record_block_inputs(model, tokens(2, 16), "cpu")
    block = decoder_layers(model)[1]
    graph = capture_block(block, hidden[0], calls[1])
    projections = find_projections(graph, block)
    generator = torch.Generator().manual_seed(0)
    replacements = {}
    for p in projections:
        weight = projection_weight(block.get_submodule(p.name))
        rank = max(1, min(weight.shape) // 2)
        down = torch.randn(rank, weight.shape[1], generator=generator) * 0.1
        up = torch.randn(weight.shape[0], rank, generator=generator) * 0.1
        replacements[p.name] = LowRankLinear.from_factors(down, up, getattr(block.get_submodule(p.name), "bias", None),
                                                          torch.float32, "cpu")
    LowRankRewritePass(projections, replacements)(graph)
    for name, module in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent), child, module)
    with torch.no_grad():
        for x in hidden:
            from_graph = graph(x, *calls[1].args, **calls[1].kwargs)
            from_block = run_block(block, x, calls[1])
            torch.testing.assert_close(from_graph, from_block, rtol=0, atol=1e-6)
            assert (from_block - run_block(decoder_layers(tiny_model(family))[1], x, calls[1])).abs().max() > 1e-3


@pytest.mark.parametrize("options", [dict(), dict(kv_ratio=0.5)])
def test_sequential_save_load_round_trip(family, options, tiny_model, tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    compressor = ASVDCompressor(tiny_model(family))
    report = compressor.compress(ASVDConfig(param_ratio=0.8, pipeline="sequential", **options, **SMALL),
                                 calibration=tokens(4, 16), save_dir=tmp_path / "out", progress=False)
    assert 0.75 < report.selected_ratio <= 0.8
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = tokens(2, 12, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, compressor.model(ids).logits, rtol=0, atol=0)


def test_sequential_calibration_changes_the_factors_of_later_blocks(tiny_model, tokens):
    """Block 1 sees compressed block-0 outputs; block 0 sees the same inputs either way."""
    windows = tokens(4, 16)
    factors = {}
    for label, options in {"off": dict(sequential_calibration=False), "on": {}}.items():
        compressor = ASVDCompressor(tiny_model("llama"))
        compressor.compress(ASVDConfig(param_ratio=0.6, allocation="uniform", pipeline="sequential", lowrank_form="pair",
                                       **options, **SMALL), calibration=windows, progress=False)
        factors[label] = _factors(compressor.model)
    first = "model.layers.0.self_attn.q_proj"
    later = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(factors["on"][first][0], factors["off"][first][0])  # block 0 sees the same inputs
    assert not torch.allclose(factors["on"][later][0], factors["off"][later][0])


@pytest.mark.parametrize("head_chunk", ["window", "8 positions"])
def test_blockwise_fisher_equals_whole_model_fisher(family, head_chunk, tiny_model, tokens, monkeypatch):
    if head_chunk != "window":  # the head gradient over chunks of 8 positions (2 chunks per 16-token window)
        monkeypatch.setattr(SequentialPipeline, "head_chunk_elements", 1)
    model = tiny_model(family)
    windows = tokens(3, 16)
    names = [n for n, m in model.named_modules() if n.startswith(_prefix(model)) and isinstance(m, torch.nn.Module)
             and hasattr(m, "weight") and getattr(m, "weight").dim() == 2 and "." in n]
    names = [n for n in names if "norm" not in n and "ln" not in n.rsplit(".", 1)[-1]]
    expected = output_fisher(model, names, windows, progress=False)
    pipeline = SequentialPipeline(model, _Resident(), ASVDConfig(param_ratio=0.8, **SMALL), windows, "cpu",
                                  lambda name, module: True, progress=False)
    hidden, calls = record_block_inputs(model, windows, "cpu")
    layers = decoder_layers(model)
    inputs = [hidden]
    with torch.no_grad():
        for i, layer in enumerate(layers[:-1]):
            inputs.append([run_block(layer, x, calls[i]) for x in inputs[-1]])
        last = [run_block(layers[-1], x, calls[-1]) for x in inputs[-1]]
    grads = pipeline._head_gradients(last)
    got = {}
    for i in range(len(layers) - 1, -1, -1):
        block_names = [n for n in names if n.startswith(f"{_prefix(model)}.{i}.")]
        fisher, grads = pipeline._block_fisher(layers[i], None, block_names, inputs[i], grads, calls[i])
        got.update(fisher)
    assert got.keys() == expected.keys()
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-12)


class _Resident:
    def load(self, prefix, block):
        return block

    def release(self, prefix, block, dtype):
        pass


def _prefix(model):
    from asvd_passes.pipelines.blocks import block_prefix

    return block_prefix(model)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_sharded_model_compresses_block_by_block_and_reloads(family, tiny_model, tokens, tmp_path):
    """A checkpoint in several shards, read one block at a time, gives what the in-memory run gives."""
    from transformers import AutoModelForCausalLM

    tiny_model(family).save_pretrained(tmp_path / "source", max_shard_size="20KB")
    assert len(list((tmp_path / "source").glob("*.safetensors"))) > 1
    config = ASVDConfig(param_ratio=0.8, kv_ratio=0.5, pipeline="sequential", **SMALL)
    windows, ids = tokens(4, 16), tokens(2, 12, seed=4)
    offloaded = ASVDCompressor.from_pretrained(str(tmp_path / "source"))
    offloaded.compress(config, calibration=windows, save_dir=tmp_path / "offloaded", progress=False)
    assert offloaded._model is None  # never loaded whole
    resident = ASVDCompressor(tiny_model(family))
    resident.compress(config, calibration=windows, save_dir=tmp_path / "resident", progress=False)
    assert len(list((tmp_path / "offloaded").glob("model-*-of-*.safetensors"))) > 1
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "offloaded")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "resident")
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(offloaded.model(ids).logits, b(ids).logits, rtol=0, atol=0)  # lazily reloaded


def test_offloaded_pass_two_holds_no_embeddings(tiny_model, tokens, tmp_path, monkeypatch):
    """Read from shards, the embeddings and LM head go back to meta once pass 1 is done (the writer
    re-reads them from the source shards), and the output still reloads whole."""
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "source", max_shard_size="20KB")
    seen = []
    factor = SequentialPipeline._factor

    def spy(self, *args):
        seen.append({name: p.device.type for name, p in self.model.named_parameters() if ".layers." not in name})
        return factor(self, *args)

    monkeypatch.setattr(SequentialPipeline, "_factor", spy)
    compressor = ASVDCompressor.from_pretrained(str(tmp_path / "source"))
    compressor.compress(ASVDConfig(param_ratio=0.8, pipeline="sequential", **SMALL), calibration=tokens(4, 16),
                        save_dir=tmp_path / "out", progress=False)
    assert seen and "model.embed_tokens.weight" in seen[0] and set(seen[0].values()) == {"meta"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.model.embed_tokens.weight.device.type == "cpu"


def test_offloaded_run_frees_each_dense_weight_once_factored(tiny_model, tokens, tmp_path, monkeypatch):
    """Read from shards, a projection's dense weight is freed as soon as its SVD is taken (pass 1) or its
    factors are built (pass 2): at every SVD, at most the projections of the input being factored are
    still dense in the block, and the output is the same model as an in-memory run."""
    import asvd_passes.pipelines.sequential as sequential
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "source", max_shard_size="20KB")
    compressor = ASVDCompressor.from_pretrained(str(tmp_path / "source"))
    dense_at_svd, pipelines = [], []
    of, run = sequential.ScaledSVD.of, SequentialPipeline.run

    def keep(self):
        pipelines.append(self)
        return run(self)

    def spy(weight, scaling, *args):
        layers = pipelines[-1].layers
        block = next(l for l in layers if any(p.device.type != "meta" for p in l.parameters()))
        dense_at_svd.append(sorted(name for name, module in block.named_modules()
                                   if isinstance(module, torch.nn.Linear) and name.count(".") == 1
                                   and module.weight.device.type != "meta"))
        return of(weight, scaling, *args)

    monkeypatch.setattr(sequential.ScaledSVD, "of", spy)
    monkeypatch.setattr(SequentialPipeline, "run", keep)
    config = ASVDConfig(param_ratio=0.8, allocation="fisher", pipeline="sequential", **SMALL)
    windows, ids = tokens(4, 16), tokens(2, 12, seed=4)
    compressor.compress(config, calibration=windows, save_dir=tmp_path / "offloaded", progress=False)
    # Blocks factor q, k, v, o, gate, up, down in turn: each SVD finds one dense projection fewer.
    first_block = dense_at_svd[:7]
    assert [len(names) for names in first_block] == [7, 6, 5, 4, 3, 2, 1] and first_block[-1] == ["mlp.down_proj"]
    assert dense_at_svd.count(["mlp.down_proj"]) >= 2  # pass 1 of both blocks (pass 2 skips projections left dense)
    monkeypatch.setattr(sequential.ScaledSVD, "of", of)
    resident = ASVDCompressor(tiny_model("llama"))
    resident.compress(config, calibration=windows, save_dir=tmp_path / "resident", progress=False)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "offloaded")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "resident")
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


def test_bf16_shards_stay_bf16(tiny_model, tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("llama", dtype=torch.bfloat16).save_pretrained(tmp_path / "source", max_shard_size="20KB")
    compressor = ASVDCompressor.from_pretrained(str(tmp_path / "source"))
    compressor.compress(ASVDConfig(param_ratio=0.8, pipeline="sequential", **SMALL), calibration=tokens(4, 16),
                        save_dir=tmp_path / "out", progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}


def test_max_memory_below_one_block_fails_before_any_work(tiny_model, tokens, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(SequentialPipeline, "run", no_work)
    compressor = ASVDCompressor(tiny_model("llama"))
    with pytest.raises(MemoryBudgetError, match="max-memory 0.01 GiB is less than one decoder block needs"):
        compressor.compress(ASVDConfig(param_ratio=0.8, pipeline="sequential", max_memory=0.01, **SMALL),
                            calibration=tokens(4, 16), save_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_interrupted_sequential_run_leaves_no_output_folder(tiny_model, tokens, tmp_path, monkeypatch):
    tiny_model("llama").save_pretrained(tmp_path / "source", max_shard_size="20KB")
    original = SequentialPipeline._factor

    def interrupted(self, *args):
        done = self.on_block_done

        def fail_after_first(prefix, block):
            done(prefix, block)
            raise KeyboardInterrupt  # as a user's Ctrl-C after the first block was written

        self.on_block_done = fail_after_first
        return original(self, *args)

    monkeypatch.setattr(SequentialPipeline, "_factor", interrupted)
    compressor = ASVDCompressor.from_pretrained(str(tmp_path / "source"))
    with pytest.raises(KeyboardInterrupt):
        compressor.compress(ASVDConfig(param_ratio=0.8, pipeline="sequential", **SMALL), calibration=tokens(4, 16),
                            save_dir=tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["source"]


def test_strs_needs_the_whole_pipeline():
    with pytest.raises(ValueError, match="strs"):
        ASVDConfig(param_ratio=0.8, allocation="strs", pipeline="sequential")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sequential_on_cuda_matches_cpu(tiny_model, tokens):
    windows, ids = tokens(4, 16), tokens(2, 12, seed=2)
    logits = []
    for device in ("cpu", "cuda"):
        compressor = ASVDCompressor(tiny_model("llama"))
        compressor.compress(ASVDConfig(param_ratio=0.8, kv_ratio=0.5, pipeline="sequential", device=device, **SMALL),
                            calibration=windows, progress=False)
        model = compressor.model.to("cpu")
        with torch.no_grad():
            logits.append(model(ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-3, atol=1e-3)


def test_cuda_device_without_cuda_is_a_clear_error(tiny_model, tokens):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    compressor = ASVDCompressor(tiny_model("llama"))
    with pytest.raises(ValueError, match="no CUDA device"):
        compressor.compress(ASVDConfig(param_ratio=0.8, pipeline="sequential", device="cuda", **SMALL),
                            calibration=tokens(4, 16), progress=False)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_output_whitening_sequential_without_calibration_matches_the_whole_path(family, tiny_model, tokens):
    """``output_whitening="gradient"``: the block-by-block gradient covariances (kept on disk between the
    passes, in float32) give the whole path's ranks and factors; the factors differ from the plain run's."""
    windows = tokens(4, 16)
    factors, ranks = [], []
    for pipeline, whitening in (("whole", "gradient"), ("sequential", "gradient"), ("whole", "none")):
        compressor = ASVDCompressor(tiny_model(family))
        report = compressor.compress(
            ASVDConfig(param_ratio=0.7, pipeline=pipeline, sequential_calibration=False, output_whitening=whitening,
                       **SMALL), calibration=windows, progress=False)
        factors.append({name: m.weight.detach().clone() for name, m in compressor.model.named_modules()
                        if isinstance(m, LowRankLinear)})  # the factored matrix, whatever its storage form
        ranks.append(report.ranks)
    assert ranks[0] == ranks[1] and factors[0].keys() == factors[1].keys() and factors[0]
    for name, product in factors[0].items():
        torch.testing.assert_close(factors[1][name], product, rtol=0, atol=1e-4)
    shared = [name for name in factors[0] if name in factors[2]]
    assert any((factors[0][name] - factors[2][name]).abs().max() > 1e-3 for name in shared)


def _mlp_with_extra_projection(config):
    """Llama's MLP plus one more projection: a later block that differs from block 0 (same names otherwise)."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    class MLPWithExtraProjection(LlamaMLP):
        def __init__(self):
            super().__init__(config)
            self.extra = torch.nn.Linear(config.hidden_size, config.hidden_size, bias=False)

        def forward(self, x):
            return super().forward(x) + self.extra(x)

    return MLPWithExtraProjection()


@pytest.mark.parametrize("change", ["extra projection", "wider mlp"])
def test_blocks_that_differ_are_surveyed_block_by_block(change, tiny_model, tokens, projections_of):
    """Block 1 with one more projection, or a wider MLP, is planned and factored like block 0: nothing is left
    dense because block 0 did not have it."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    model = tiny_model("llama")
    layer = model.model.layers[1]
    if change == "extra projection":
        layer.mlp = _mlp_with_extra_projection(model.config)
        added = ["model.layers.1.mlp.extra", "model.layers.1.mlp.down_proj"]
    else:
        wider = type(model.config)(**dict(model.config.to_dict(), intermediate_size=96))
        layer.mlp = LlamaMLP(wider)
        added = ["model.layers.1.mlp.down_proj"]
    dense_params = sum(p.numel() for p in model.parameters())
    block_weights = sum(i * o for name, (i, o) in projections_of(model).items() if name.startswith("model.layers."))
    compressor = ASVDCompressor(model)
    report = compressor.compress(ASVDConfig(param_ratio=0.8, allocation="uniform", pipeline="sequential", **SMALL),
                                 calibration=tokens(4, 16), progress=False)
    factored = {name for name, m in compressor.model.named_modules() if isinstance(m, LowRankLinear)}
    assert set(report.ranks) == factored  # every planned projection factored, every factored one planned
    assert all(name in factored for name in added)
    assert len([name for name in factored if name.startswith("model.layers.1.")]) == 7 + (change == "extra projection")
    assert report.selected_params_before == block_weights  # each block's own shapes
    assert report.model_params_before == dense_params


def test_pass_two_observes_only_the_projections_it_factors(tiny_model, tokens, monkeypatch):
    """Projections the plan keeps dense need no statistics in pass 2 (a Gram matrix each, the MLP's widest);
    the factors are the same as with every projection observed."""
    import asvd_passes.pipelines.sequential as sequential

    config = ASVDConfig(param_ratio=0.9, pipeline="sequential", **SMALL)
    windows = tokens(4, 16)
    observed, phase = [], []
    insert = sequential.InsertObserversPass

    class Spy(insert):
        def __init__(self, groups, statistics):
            super().__init__(groups, statistics)
            if phase:
                observed.extend(name for group in groups for name in group.names)

    factor = SequentialPipeline._factor

    def in_pass_two(self, *args):
        phase.append(True)
        return factor(self, *args)

    monkeypatch.setattr(sequential, "InsertObserversPass", Spy)
    monkeypatch.setattr(SequentialPipeline, "_factor", in_pass_two)
    compressor = ASVDCompressor(tiny_model("llama"))
    report = compressor.compress(config, calibration=windows, progress=False)
    factored = {name for name, rank in report.ranks.items() if rank is not None}
    dense = set(report.ranks) - factored
    assert factored and dense  # the plan keeps some projections dense
    assert factored <= set(observed) and not dense & set(observed)

    observe = SequentialPipeline._observe
    monkeypatch.setattr(SequentialPipeline, "_observe", lambda self, *args, **kwargs: observe(self, *args[:4]))
    everything = ASVDCompressor(tiny_model("llama"))
    everything.compress(config, calibration=windows, progress=False)
    expected, got = _factors(everything.model), _factors(compressor.model)
    assert expected.keys() == got.keys()
    for name, (down, up) in expected.items():
        assert torch.equal(got[name][0], down) and torch.equal(got[name][1], up)
