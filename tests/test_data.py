"""Calibration sources: seeded windows, self-generated text, and the thin hf: loader."""

import sys
import types

import pytest
import torch

from asvd_passes.data import CalibrationError, random_windows, read_text, self_generated_windows


def test_random_windows_are_seeded():
    tokens = torch.arange(1000)
    a = random_windows(tokens, 4, 32, seed=0, what="t")
    assert a.shape == (4, 32) and torch.equal(a, random_windows(tokens, 4, 32, seed=0, what="t"))
    assert not torch.equal(a, random_windows(tokens, 4, 32, seed=1, what="t"))
    with pytest.raises(CalibrationError, match="fewer than one window"):
        random_windows(torch.arange(10), 1, 32, seed=0, what="t")


class StubTokenizer:
    bos_token_id, eos_token_id = 1, 2


def test_selfgen_is_reproducible_per_seed(tiny_model):
    model = tiny_model("llama")
    first = self_generated_windows(model, StubTokenizer(), samples=2, seqlen=12, seed=0)
    again = self_generated_windows(model, StubTokenizer(), samples=2, seqlen=12, seed=0)
    other = self_generated_windows(model, StubTokenizer(), samples=2, seqlen=12, seed=1)
    assert first.shape == (2, 12) and (first[:, 0] == 1).all()
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_hf_spec_is_parsed_and_rows_joined(monkeypatch):
    calls = []

    class Rows:
        column_names = ["text"]

        def __getitem__(self, key):
            return ["a", "b", "c"]

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return Rows()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert read_text("hf:wikitext:wikitext-2-raw-v1:validation") == "a\n\nb\n\nc"
    assert read_text("hf:some/corpus") == "a\n\nb\n\nc"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation"), ("some/corpus", None, "train")]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        read_text(str(tmp_path / "nope.txt"))
