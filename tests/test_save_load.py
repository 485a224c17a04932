"""Saved folders: safetensors only, reload through ``from_pretrained``, corruption checks, atomic writes, and
which existing folders may be replaced."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import asvd_passes as ap

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def compress(model, calibration, save_dir, filter_fn=None, overwrite=False, **config):
    config.setdefault("method", "whiten")
    config.setdefault("allocation", "uniform")  # these tests are about the rewrite, not rank allocation
    config.setdefault("param_ratio", 0.6)
    return ap.ASVDCompressor(model).compress(
        ap.ASVDConfig(**config), calibration=calibration, save_dir=save_dir, filter_fn=filter_fn, progress=False,
        overwrite=overwrite,
    )


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def leftovers(parent: Path) -> list[str]:
    """Staging or backup folders the atomic writer may have left beside its target."""
    return sorted(p.name for p in parent.iterdir() if ".partial" in p.name or ".old-" in p.name)


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_round_trip_identical_logits(family, tiny_model, tokens, tmp_path):
    model = tiny_model(family)
    out = tmp_path / "out"
    report = compress(model, tokens(4, 32), out)
    ids = tokens(2, 16, seed=1)
    reloaded = load(out)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))

    factored = {name: rank for name, rank in report.ranks.items() if rank is not None}
    assert factored
    lowrank = {name: m for name, m in reloaded.named_modules() if isinstance(m, ap.LowRankLinear)}
    assert {name: m.rank for name, m in lowrank.items()} == factored
    for name, module in lowrank.items():  # bit-identical factors
        original = model.get_submodule(name)
        assert torch.equal(module.down.weight, original.down.weight)
        assert torch.equal(module.up.weight, original.up.weight)

    files = sorted(p.name for p in out.iterdir())
    assert not [f for f in files if f.endswith(PICKLE_SUFFIXES)], files
    assert [f for f in files if f.endswith(".safetensors")], files
    assert {"config.json", "asvd_config.json", ap.compressor.REPORT_FILE} <= set(files)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "asvd"
    assert config["quantization_config"]["ranks"] == factored
    saved_report = json.loads((out / ap.compressor.REPORT_FILE).read_text())
    assert saved_report["ranks"] == report.ranks
    assert ap.ASVDConfig.from_pretrained(out).method == "whiten"
    assert leftovers(tmp_path) == []
    # An LM head left dense keeps its tie to the input embedding.
    tied = model.config.tie_word_embeddings
    assert reloaded.config.tie_word_embeddings == tied
    assert (reloaded.lm_head.weight is reloaded.get_input_embeddings().weight) == tied


@pytest.mark.parametrize("form", ["interpolative", "pair"])
def test_round_trip_in_each_form(form, tiny_model, tokens, tmp_path):
    """Both storage forms reload bit-identically; a folder that records no form (older ones) holds pairs."""
    model = tiny_model("qwen2")  # q/k/v carry biases
    out = tmp_path / "out"
    compress(model, tokens(4, 32), out, lowrank_form=form)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["lowrank_form"] == form
    tensors = load_file(next(out.glob("*.safetensors")))
    assert any(key.endswith(".rows") for key in tensors) == (form == "interpolative")
    if form == "pair":
        del config["quantization_config"]["lowrank_form"]
        (out / "config.json").write_text(json.dumps(config))
    reloaded = load(out)
    assert all(m.interpolative == (form == "interpolative")
               for m in reloaded.modules() if isinstance(m, ap.LowRankLinear))
    ids = tokens(2, 16, seed=1)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral"])  # tied, tied, untied LM head
def test_round_trip_with_lm_head(family, tiny_model, tokens, tmp_path):
    model = tiny_model(family)
    out = tmp_path / "out"
    report = compress(model, tokens(4, 32), out, include_lm_head=True)
    assert report.ranks["lm_head"] is not None
    ids = tokens(2, 16, seed=1)
    assert model.config.tie_word_embeddings is False  # a factored head cannot share the embedding's weight
    reloaded = load(out)
    assert reloaded.config.tie_word_embeddings is False
    assert isinstance(reloaded.lm_head, ap.LowRankLinear)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    # The input embedding survives the (un)tying intact.
    assert torch.equal(reloaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


@pytest.fixture
def saved(tiny_model, tokens, tmp_path):
    """A compressed Qwen2 folder (with biases on q/k/v) and its safetensors state dict."""
    out = tmp_path / "saved"
    report = compress(tiny_model("qwen2"), tokens(4, 32), out)
    files = list(out.glob("*.safetensors"))
    assert len(files) == 1
    return out, files[0], load_file(files[0]), report


def test_missing_factor_raises(saved):
    out, file, tensors, _ = saved
    key = "model.layers.1.self_attn.k_proj.up.weight"
    assert key in tensors
    del tensors[key]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ap.CorruptCompressedModelError, match=r"missing: .*" + key.replace(".", r"\.")):
        load(out)


def test_missing_bias_raises(saved):
    out, file, tensors, _ = saved
    key = "model.layers.0.self_attn.q_proj.up.bias"
    assert key in tensors
    del tensors[key]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ap.CorruptCompressedModelError, match=key.replace(".", r"\.")):
        load(out)


def test_wrong_factor_shape_raises(saved):
    out, file, tensors, report = saved
    name = "model.layers.0.mlp.down_proj"
    rank = report.ranks[name]
    key = f"{name}.down.weight"
    assert tensors[key].shape == (rank, 64)
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ap.CorruptCompressedModelError, match=rf"mismatched: {key.replace('.', '[.]')}: saved \({rank - 1}, 64\)"):
        load(out)


def test_pickle_checkpoint_refused(saved):
    out, file, tensors, _ = saved
    file.unlink()
    torch.save(tensors, out / "pytorch_model.bin")
    with pytest.raises(ap.CorruptCompressedModelError, match=r"pytorch_model\.bin: .*safetensors only"):
        load(out)


def test_failing_filter_leaves_no_folder(tiny_model, tokens, tmp_path):
    out = tmp_path / "out"

    def explode(name, module):
        raise RuntimeError("filter failed")

    with pytest.raises(RuntimeError, match="filter failed"):
        compress(tiny_model("llama"), tokens(2, 16), out, filter_fn=explode)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_failing_save_leaves_no_folder(tiny_model, tokens, tmp_path, monkeypatch):
    model = tiny_model("gpt2")
    out = tmp_path / "out"
    real_save = model.save_pretrained

    def save_then_fail(folder, *args, **kwargs):
        real_save(folder, *args, **kwargs)  # half-written folder: weights there, the rest missing
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        compress(model, tokens(2, 16), out)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def svd_compress(compressor, tokens, save_dir, **kwargs):
    """The cheapest ``compress`` that saves: plain SVD, uniform ranks, two short windows."""
    config = ap.ASVDConfig(method="svd", allocation="uniform", param_ratio=0.6)
    return compressor.compress(config, calibration=tokens(2, 16), save_dir=save_dir, progress=False, **kwargs)


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_folder_refused_without_overwrite(tiny_model, tokens, tmp_path):
    out = tmp_path / "out"
    svd_compress(ap.ASVDCompressor(tiny_model("llama")), tokens, out)
    before = file_hashes(out)
    with pytest.raises(ap.OutputExistsError, match=rf"{re.escape(str(out))} already exists; pass --overwrite"):
        svd_compress(ap.ASVDCompressor(tiny_model("llama", seed=1)), tokens, out)
    assert file_hashes(out) == before
    assert leftovers(tmp_path) == []


def test_folder_asvd_wrote_replaced_with_overwrite(tiny_model, tokens, tmp_path):
    out = tmp_path / "out"
    svd_compress(ap.ASVDCompressor(tiny_model("opt")), tokens, out)
    (out / "stale.txt").write_text("old run")
    model = tiny_model("opt", seed=1)
    svd_compress(ap.ASVDCompressor(model), tokens, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert leftovers(tmp_path) == []
    ids = tokens(1, 8)
    assert torch.equal(logits(load(out), ids), logits(model, ids))


def test_empty_existing_folder_accepted(tiny_model, tokens, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    model = tiny_model("llama")
    svd_compress(ap.ASVDCompressor(model), tokens, out)
    assert torch.equal(logits(load(out), tokens(1, 8)), logits(model, tokens(1, 8)))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_folder_asvd_did_not_write_refused_even_with_overwrite(tiny_model, tokens, tmp_path, overwrite):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "model.safetensors").write_bytes(b"not ours")
    before = file_hashes(out)
    with pytest.raises(ap.OutputExistsError, match=rf"{re.escape(str(out))} is not empty and holds no asvd_report.json"):
        svd_compress(ap.ASVDCompressor(tiny_model("llama")), tokens, out, overwrite=overwrite)
    assert file_hashes(out) == before
    assert leftovers(tmp_path) == []


@pytest.fixture
def model_folder(tmp_path):
    """A saved tiny Llama that ``from_pretrained`` opens lazily (the sequential pipeline reads it block by block),
    marked as if asvd wrote it, so that only the input rule can refuse replacing it."""
    from conftest import make_tiny_model

    folder = tmp_path / "models" / "llama"
    make_tiny_model("llama").save_pretrained(folder)
    (folder / ap.compressor.REPORT_FILE).write_text("{}")
    return folder


@pytest.mark.parametrize("pipeline", ["whole", "sequential"])
def test_input_folder_and_folders_holding_it_refused(model_folder, tokens, tmp_path, pipeline):
    before = file_hashes(tmp_path / "models")
    (tmp_path / "link").symlink_to(model_folder, target_is_directory=True)
    config = ap.ASVDConfig(method="svd", allocation="uniform", param_ratio=0.6, pipeline=pipeline)
    for target in (model_folder, model_folder.parent, tmp_path / "link"):
        compressor = ap.ASVDCompressor.from_pretrained(str(model_folder))
        with pytest.raises(ap.OutputExistsError, match=r"(is|contains) the input .*choose another output folder"):
            compressor.compress(config, calibration=tokens(2, 16), save_dir=target, overwrite=True, progress=False)
        # A model loaded elsewhere remembers its folder (config._name_or_path) and is refused the same way.
        loaded = ap.ASVDCompressor(AutoModelForCausalLM.from_pretrained(model_folder))
        with pytest.raises(ap.OutputExistsError, match="the input"):
            loaded.compress(config, calibration=tokens(2, 16), save_dir=target, overwrite=True, progress=False)
    assert file_hashes(tmp_path / "models") == before
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "models") == []


@pytest.mark.parametrize("pipeline", ["whole", "sequential"])
def test_output_refused_before_any_work(model_folder, tokens, tmp_path, monkeypatch, pipeline):
    """Loading and calibration (minutes to hours on a real model) do not start when the output is refused."""
    reached = []
    monkeypatch.setattr(ap.ASVDCompressor, "_calibration", lambda self, *args: reached.append("calibration"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    compressor = ap.ASVDCompressor.from_pretrained(str(model_folder))
    config = ap.ASVDConfig(method="svd", allocation="uniform", param_ratio=0.6, pipeline=pipeline)
    with pytest.raises(ap.OutputExistsError):
        compressor.compress(config, calibration=tokens(2, 16), save_dir=out, overwrite=True, progress=False)
    assert reached == [] and compressor._model is None  # neither calibrated nor loaded


def test_existing_folder_kept_when_save_fails(tiny_model, tokens, tmp_path, monkeypatch):
    out = tmp_path / "out"
    svd_compress(ap.ASVDCompressor(tiny_model("phi3")), tokens, out)
    before = file_hashes(out)
    model = tiny_model("phi3", seed=1)

    def fail(folder, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        svd_compress(ap.ASVDCompressor(model), tokens, out, overwrite=True)
    assert file_hashes(out) == before
    assert leftovers(tmp_path) == []


def test_save_dir_that_is_a_file(tiny_model, tokens, tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(ap.OutputExistsError, match="exists and is not a folder"):
        compress(tiny_model("llama"), tokens(2, 16), target, overwrite=True)
    assert target.read_text() == "a file"
    assert leftovers(tmp_path) == []


def test_optimum_quantize_entry_point_saves_like_compress(tiny_model, tokens, tmp_path):
    model = tiny_model("llama")
    config = ap.ASVDConfig(method="svd", allocation="uniform", param_ratio=0.6)
    report = ap.ASVDCompressor(model).quantize(tmp_path / "out", config=config, calibration=tokens(2, 16), progress=False)
    assert report.selected_ratio <= 0.6
    assert torch.equal(logits(load(tmp_path / "out"), tokens(1, 8, seed=2)), logits(model, tokens(1, 8, seed=2)))
    with pytest.raises(TypeError, match="file_prefix"):  # a whole folder is written: no prefix is silently ignored
        ap.ASVDCompressor(tiny_model("llama")).quantize(tmp_path / "other", file_prefix="x", config=config)
