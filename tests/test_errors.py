"""Clear errors for inputs the pipeline cannot handle."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import asvd_passes as ap
from asvd_passes.data import random_windows
from asvd_passes.models import load_model_and_tokenizer


class NoProjections(nn.Module):
    """A 'language model' with an embedding and no linear layer at all."""

    def __init__(self, vocab: int = 16, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def forward(self, input_ids, use_cache=False):
        return self.embed(input_ids).cumsum(1)


def test_model_without_projections_raises():
    with pytest.raises(ap.NoProjectionsError, match="NoProjections has no linear projections"):
        ap.ASVDCompressor(NoProjections()).compress(
            ap.ASVDConfig(method="svd", allocation="uniform", param_ratio=0.5), calibration=torch.zeros(1, 4, dtype=torch.long), progress=False
        )


def test_filter_rejecting_everything_raises(tiny_model, tokens):
    model = tiny_model("opt")
    with pytest.raises(ap.NoProjectionsError, match="No projection is left"):
        ap.ASVDCompressor(model).compress(
            ap.ASVDConfig(method="svd", allocation="uniform", param_ratio=0.5),
            calibration=tokens(1, 8),
            filter_fn=lambda name, module: False,
            progress=False,
        )
    assert not any(isinstance(m, ap.LowRankLinear) for m in model.modules())


def test_filter_narrows_selection(tiny_model, tokens):
    model = tiny_model("gpt2")
    report = ap.ASVDCompressor(model).compress(
        ap.ASVDConfig(method="svd", allocation="uniform", param_ratio=0.5),
        calibration=tokens(1, 8),
        filter_fn=lambda name, module: name.endswith("mlp.c_fc"),
        progress=False,
    )
    assert set(report.ranks) == {"transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"}


def test_no_projections_is_reported_as_one_clear_line_and_caught_as_value_error(capsys):
    from asvd_passes.cli import run_reporting_errors

    def compress(args):
        ap.ASVDCompressor(NoProjections()).compress(
            ap.ASVDConfig(method="svd", allocation="uniform", param_ratio=0.5), calibration=torch.zeros(1, 4, dtype=torch.long), progress=False
        )

    assert run_reporting_errors(compress, None) == 2
    assert capsys.readouterr().err == "asvd: error: NoProjections has no linear projections to compress\n"
    try:  # code written against the built-in class still catches it
        compress(None)
    except ValueError as err:
        assert "no linear projections" in str(err)
    else:
        pytest.fail("no error raised")


@pytest.mark.parametrize("ratio", [0, 1.5])
def test_bad_param_ratio(ratio):
    with pytest.raises(ValueError, match=r"param_ratio must lie in \(0, 1\]"):
        ap.ASVDConfig(param_ratio=ratio)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="pca"), "Unknown method"),
        (dict(asvd_statistic="median"), "Unknown asvd_statistic"),
        (dict(alpha=-1.0), "alpha must be"),
        (dict(calib_samples=0), "calib_samples"),
        (dict(seqlen=1), "seqlen"),
        (dict(lowrank_form="triple"), "Unknown lowrank_form"),
        (dict(allocation="strs", lowrank_form="interpolative"), "strs.*pair"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ap.ASVDConfig(**kwargs)


def test_config_with_nothing_to_compress_is_an_error():
    config = ap.ASVDConfig(method="svd", allocation="uniform", kv_ratio=0.5)  # K/V only; weights dense
    config.kv_ratio = None  # now nothing at all is asked for
    with pytest.raises(ValueError, match="Give a param_ratio in"):
        config.validate()


def test_config_mutated_after_construction_is_revalidated(tiny_model, tokens):
    config = ap.ASVDConfig(method="svd", allocation="uniform", param_ratio=0.5)
    config.param_ratio = 2.0
    with pytest.raises(ValueError, match="param_ratio"):
        ap.ASVDCompressor(tiny_model("llama")).compress(config, calibration=tokens(1, 8), progress=False)


@pytest.mark.parametrize("length", [0, 5, 16])
def test_calibration_shorter_than_one_window(length):
    with pytest.raises(ap.CalibrationError, match=f"has {length} tokens, fewer than one window of seqlen=16"):
        random_windows(torch.arange(length), samples=2, seqlen=16, seed=0, what="calibration text tiny.txt")


def test_calibration_of_exactly_one_window_plus_one():
    windows = random_windows(torch.arange(17), samples=3, seqlen=16, seed=0, what="text")
    assert windows.shape == (3, 16)
    assert torch.equal(windows, random_windows(torch.arange(17), samples=3, seqlen=16, seed=0, what="text"))


def test_bad_calibration_tensor(tiny_model):
    compressor = ap.ASVDCompressor(tiny_model("llama"))
    for bad in (torch.zeros(8, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"\(samples, seqlen\)"):
            compressor.compress(ap.ASVDConfig(method="svd", allocation="uniform", param_ratio=0.5), calibration=bad, progress=False)


def test_statistics_without_tokenizer_or_ids(tiny_model):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        ap.ASVDCompressor(tiny_model("llama")).compress(ap.ASVDConfig(method="whiten", seqlen=32), progress=False)


def test_unknown_architecture(tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no_such_arch", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"(?s)Unknown or unsupported model architecture.*no_such_arch"):
        load_model_and_tokenizer(folder)


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model_and_tokenizer(tmp_path)
