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


def test_sample_tokens_draws_from_the_softmax():
    from asvd_passes.data import sample_tokens

    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf")], [3.0, 0.0, 0.0, 0.0]])
    rows = 20000
    drawn = sample_tokens(logits.repeat_interleave(rows, 0), torch.Generator().manual_seed(0)).view(2, rows)
    for row, expected in zip(drawn, logits.softmax(-1)):
        frequency = torch.bincount(row, minlength=4).double() / rows
        assert (frequency - expected.double()).abs().max() < 0.015  # ~4 standard deviations at 20000 draws
    assert not (drawn[0] == 3).any()  # a token of probability zero (the last one, past the cdf's end) never is


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_selfgen_cache_gives_what_transformers_dynamic_cache_gives(tiny_model, family, monkeypatch):
    """The preallocated cache layer returns the same keys/values as ``DynamicLayer`` (gemma2: sliding layers kept)."""
    import asvd_passes.data as data

    model = tiny_model(family)
    ours = self_generated_windows(model, StubTokenizer(), samples=2, seqlen=24, seed=3)
    monkeypatch.setattr(data, "_PreallocatedLayer", lambda capacity: data.DynamicLayer())
    assert torch.equal(ours, self_generated_windows(model, StubTokenizer(), samples=2, seqlen=24, seed=3))


def test_selfgen_never_samples_an_end_of_sequence_token(tiny_model):
    """Every window is full length: the tokenizer's EOS and the generation config's EOS ids are suppressed,
    here on a head biased to draw them almost always."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = [2, 5]
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[[2, 5]] = 50.0
    model.lm_head = biased
    windows = self_generated_windows(model, StubTokenizer(), samples=3, seqlen=16, seed=0)
    assert windows.shape == (3, 16)
    assert not torch.isin(windows[:, 1:], torch.tensor([2, 5])).any()
