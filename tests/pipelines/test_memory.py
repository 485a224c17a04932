"""The ``auto`` pipeline rule and the memory estimates it reads."""

from __future__ import annotations

from asvd_passes import ASVDCompressor, ASVDConfig
from asvd_passes.allocation.block_cache import decoder_layers
from asvd_passes.pipelines.memory import GIB, estimate


def _choice(model, **options):
    return ASVDCompressor(model).choose_pipeline(ASVDConfig(seqlen=16, calib_samples=4, **options))


def test_auto_takes_the_sequential_path_whether_or_not_the_whole_one_fits(tiny_model):
    model = tiny_model("llama")
    needed = estimate(model, decoder_layers(model), 4, 16)
    assert needed.one_block < needed.whole_path
    # Both branches pick the sequential path; the reason says which one was taken and with what figures
    # (``describe()`` names the whole-model path in both, so only the full text tells them apart).
    roomy = needed.whole_path * 2 / GIB
    assert _choice(model, param_ratio=0.8, max_memory=roomy) == (
        "sequential", f"it measures better where both fit ({needed.describe()}; {roomy:.1f} GiB available)")
    between = (needed.one_block + needed.whole_path) / 2 / GIB
    assert _choice(model, param_ratio=0.8, max_memory=between) == (
        "sequential", f"{needed.describe()}; {between:.1f} GiB available")


def test_auto_keeps_strs_and_the_lm_head_on_the_whole_path(tiny_model):
    model = tiny_model("llama")
    tight = estimate(model, decoder_layers(model), 4, 16).one_block * 1.01 / GIB
    assert _choice(model, param_ratio=0.8, allocation="strs", max_memory=tight)[0] == "whole"
    assert _choice(model, param_ratio=0.8, include_lm_head=True, max_memory=tight)[0] == "whole"
    assert _choice(model, param_ratio=0.8, pipeline="sequential")[1] == "asked for"


def test_sequential_estimate_does_not_grow_with_depth(tiny_model):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    estimates = []
    for layers in (2, 8):
        config = tiny_config("llama")
        config.num_hidden_layers = layers
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        estimates.append(estimate(model, decoder_layers(model), 4, 16))
    assert estimates[1].one_block == estimates[0].one_block
    assert estimates[1].whole_path > estimates[0].whole_path


def test_available_memory_without_proc_meminfo_or_sysconf(monkeypatch):
    """Windows: no /proc/meminfo and no ``os.sysconf``; psutil says what is available."""
    import os
    import sys
    import types

    import torch

    from asvd_passes.pipelines import memory

    def no_proc(path, *args, **kwargs):
        raise OSError(path)

    monkeypatch.setattr(memory, "open", no_proc, raising=False)
    monkeypatch.delattr(os, "sysconf", raising=False)
    monkeypatch.setitem(sys.modules, "psutil", types.SimpleNamespace(virtual_memory=lambda: types.SimpleNamespace(available=7 << 30)))
    assert memory.available_bytes(torch.device("cpu")) == 7 << 30
