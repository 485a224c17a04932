"""Checkpoint folders written by ``save_pretrained``, compressed through the default CLI path (read block by
block from the shards) and reloaded with ``from_pretrained``: keys as transformers maps them, on every family."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from asvd_passes.cli import main
from asvd_passes.pipelines.blocks import block_prefix

from conftest import BOS, EOS, PAD, VOCAB, linear_projections, token_batch

CALIB = ["--calib-samples", "4", "--seqlen", "16", "--sensitivity-samples", "2"]
TEXT = " ".join(f"word{i % 37} and text {i * 7 % 11}, said the {i % 5}th line." for i in range(200))


def char_tokenizer():
    """One token per ASCII character (ids 3-127), the tiny models' 128-token vocabulary."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{chr(i): i for i in range(3, VOCAB)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>")),
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def stored_params(folder) -> int:
    """Floating-point elements in a folder's safetensors files (what its parameters are)."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                if tensor.get_dtype().startswith(("F", "BF")):
                    total += torch.Size(tensor.get_shape()).numel()
    return total


@pytest.fixture
def saved_folder(tiny_model, tmp_path):
    """Factory: ``saved_folder(family, dtype=float32)`` → a ``save_pretrained`` folder with a character tokenizer."""
    def save(family: str, dtype: torch.dtype = torch.float32):
        folder = tmp_path / f"{family}-source"
        tiny_model(family, dtype=dtype).save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
        return folder

    return save


@pytest.fixture
def compress_folder(tmp_path, monkeypatch):
    """Factory: ``compress_folder(folder, *options)`` runs ``asvd compress FOLDER --calib TEXT`` in-process and
    returns the output folder; the model is never loaded whole (the offloaded branch runs)."""
    import asvd_passes.models

    def never_loaded_whole(*args, **kwargs):
        raise AssertionError("the default path loaded the whole model instead of reading it block by block")

    monkeypatch.setattr(asvd_passes.models, "load_model", never_loaded_whole)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)

    def compress(folder, *options):
        out = tmp_path / f"{folder.name}-out-{len(list(tmp_path.iterdir()))}"
        assert main(["compress", str(folder), "--out", str(out), "--calib", str(calib), *CALIB, *options]) == 0
        return out

    return compress


def _logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits


def _full_ranks(family, tiny_model, path):
    model = tiny_model(family)
    prefix = block_prefix(model) + "."
    ranks = {name: min(shape) for name, shape in linear_projections(model).items() if name.startswith(prefix)}
    path.write_text(json.dumps(ranks))
    return path


@pytest.mark.parametrize("options", ["kv", "ranks"])
def test_saved_folder_at_full_rank_reproduces_dense_logits(family, options, saved_folder, compress_folder, tiny_model,
                                                          tmp_path):
    """Full-rank latent K/V, or every block projection factored at full rank, gives the dense logits."""
    folder = saved_folder(family)
    args = ["--kv-ratio", "1.0"] if options == "kv" else ["--ranks", str(_full_ranks(family, tiny_model, tmp_path / "r.json"))]
    out = compress_folder(folder, *args)
    report = json.loads((out / "asvd_report.json").read_text())
    assert report["pipeline"]["name"] == "sequential"
    if options == "ranks":
        assert report["ranks"] and all(rank is not None for rank in report["ranks"].values())
    ids = token_batch(2, 12, seed=4)
    torch.testing.assert_close(_logits(out, ids), _logits(folder, ids), rtol=0, atol=1e-4)


def test_saved_folder_compresses_at_a_param_ratio_and_reloads(family, saved_folder, compress_folder):
    folder = saved_folder(family)
    out = compress_folder(folder, "--param-ratio", "0.9")
    report = json.loads((out / "asvd_report.json").read_text())
    assert report["selected_ratio"] <= 0.9 and any(rank is not None for rank in report["ranks"].values())
    # The whole-model ratio is that of the written files (tied weights once, as transformers stores them).
    assert report["model_params_before"] == stored_params(folder)
    assert report["model_params_after"] == stored_params(out)
    assert torch.isfinite(_logits(out, token_batch(2, 12, seed=4))).all()


def test_selfgen_keeps_the_stored_dtype_and_reports_the_written_params(saved_folder, tmp_path, monkeypatch):
    """The default calibration (selfgen) loads the tied Llama whole, in float32: the output is still bfloat16 like
    its input, and the report's whole-model figures are those of the written files (tied weights once)."""
    import asvd_passes.models
    from transformers import AutoModelForCausalLM

    loads = []
    load_model = asvd_passes.models.load_model
    monkeypatch.setattr(asvd_passes.models, "load_model", lambda *a, **k: loads.append(a) or load_model(*a, **k))
    folder = saved_folder("llama", dtype=torch.bfloat16)
    out = tmp_path / "out"
    assert main(["compress", str(folder), "--out", str(out), "--param-ratio", "0.9", *CALIB]) == 0
    assert loads  # the in-memory branch ran (selfgen generates with the whole model)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    report = json.loads((out / "asvd_report.json").read_text())
    assert report["model_params_before"] == stored_params(folder)
    assert report["model_params_after"] == stored_params(out)
    assert report["model_ratio"] == stored_params(out) / stored_params(folder)
