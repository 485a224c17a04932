"""Each allocation drives a real compress() on a tiny model: exact budget, sensible ranks, save/load."""

import pytest
import torch

import asvd_passes as ap
from asvd_passes.ranks import ProjectionShape


@pytest.mark.parametrize("allocation", ["fisher", "strs"])
@pytest.mark.parametrize("ratio", [0.9, 0.6])
def test_allocation_meets_exact_budget(allocation, ratio, tiny_model, tokens, tmp_path, monkeypatch):
    monkeypatch.setenv("ASVD_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_model("llama")
    config = ap.ASVDConfig(method="whiten", allocation=allocation, param_ratio=ratio, sensitivity_samples=2,
                           strs_candidates=(0.2, 0.4, 0.6, 0.8))
    report = ap.ASVDCompressor(model).compress(config, calibration=tokens(4, 32), save_dir=tmp_path / "out", progress=False)
    assert report.allocation == allocation
    assert report.selected_ratio <= ratio + 1e-9
    # Within one rank step of one projection of the requested budget (largest in+out here is 32+64).
    assert ratio * report.selected_params_before - report.selected_params_after <= 96 * 8
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = tokens(2, 16, seed=4)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    # The report's counts, recounted from the reloaded model's modules and a fresh dense copy.
    dense = tiny_model("llama")
    before = after = 0
    for name, rank in report.ranks.items():
        module, original = reloaded.get_submodule(name), dense.get_submodule(name)
        before += original.weight.numel()
        if rank is None:
            assert isinstance(module, torch.nn.Linear)
            after += module.weight.numel()
        else:
            assert isinstance(module, ap.LowRankLinear) and module.down.weight.shape[0] == rank
            after += module.down.weight.numel() + module.up.weight.numel()
    assert (report.selected_params_before, report.selected_params_after) == (before, after)
    assert report.selected_ratio == after / before
    assert report.model_params_before == sum(p.numel() for p in dense.parameters())
    assert report.model_params_after == sum(p.numel() for p in reloaded.parameters())


def test_fisher_beats_uniform_on_calibration_loss(tiny_model, tokens):
    calib = tokens(8, 32)

    def loss_after(allocation):
        model = tiny_model("llama")
        ap.ASVDCompressor(model).compress(
            ap.ASVDConfig(method="whiten", allocation=allocation, param_ratio=0.6, sensitivity_samples=8),
            calibration=calib, progress=False,
        )
        with torch.no_grad():
            return model(input_ids=calib, labels=calib).loss.item()

    assert loss_after("fisher") < loss_after("uniform")


def test_strs_sensitivities_are_cached_and_ppl_target_mode(tiny_model, tokens, tmp_path, monkeypatch):
    monkeypatch.setenv("ASVD_CACHE_DIR", str(tmp_path))
    calib = tokens(4, 32)
    config = ap.ASVDConfig(method="asvd", allocation="strs", param_ratio=0.7, sensitivity_samples=2)
    first = ap.ASVDCompressor(tiny_model("llama")).compress(config, calibration=calib, progress=False)
    cached = list((tmp_path / "sensitivities").glob("*.json"))
    assert len(cached) == 1
    second = ap.ASVDCompressor(tiny_model("llama")).compress(config, calibration=calib, progress=False)
    assert first.ranks == second.ranks and len(list((tmp_path / "sensitivities").glob("*.json"))) == 1
    # Other calibration data → another cache entry, never the stale one.
    ap.ASVDCompressor(tiny_model("llama")).compress(config, calibration=tokens(4, 32, seed=9), progress=False)
    assert len(list((tmp_path / "sensitivities").glob("*.json"))) == 2
    # ppl_target: a huge target admits every projection's smallest candidate.
    target = ap.ASVDConfig(method="asvd", allocation="strs", param_ratio=None, ppl_target=1e9, sensitivity_samples=2)
    report = ap.ASVDCompressor(tiny_model("llama")).compress(target, calibration=calib, progress=False)
    assert all(rank is not None for rank in report.ranks.values())


def test_rank_multiple_rounds_every_rank(tiny_model, tokens):
    for allocation in ("uniform", "fisher"):
        report = ap.ASVDCompressor(tiny_model("llama")).compress(
            ap.ASVDConfig(method="whiten", allocation=allocation, param_ratio=0.5, rank_multiple=8),
            calibration=tokens(4, 32), progress=False,
        )
        assert all(rank % 8 == 0 for rank in report.ranks.values() if rank is not None)


def test_unknown_allocation_and_misused_ppl_target():
    with pytest.raises(ValueError, match="allocation"):
        ap.ASVDConfig(allocation="magic")
    with pytest.raises(ValueError, match="ppl_target"):
        ap.ASVDConfig(allocation="fisher", ppl_target=30.0)


def test_sensitivity_time_is_charged_once_per_compression(tiny_model, tokens, monkeypatch):
    """The first compression of an analysis measures the sensitivities; it must not count them twice."""
    import asvd_passes.pipelines.whole as compressor_module
    from asvd_passes.modules import replace_module

    clock = [0.0]  # a clock that only moves while the (fake-slow) sensitivity pass runs
    monkeypatch.setattr(compressor_module.time, "perf_counter", lambda: clock[0])
    real_fisher = compressor_module.output_fisher

    def fisher_taking_100_s(*args, **kwargs):
        clock[0] += 100.0
        return real_fisher(*args, **kwargs)

    monkeypatch.setattr(compressor_module, "output_fisher", fisher_taking_100_s)
    model = tiny_model("llama")
    compressor = ap.ASVDCompressor(model)
    config = ap.ASVDConfig(method="whiten", allocation="fisher", param_ratio=0.8, sensitivity_samples=2)
    analysis = compressor.analyze(config, calibration=tokens(4, 32), progress=False)
    dense = {name: model.get_submodule(name) for name in analysis.shapes}
    charged = []
    for _ in range(2):
        charged.append(compressor.apply(analysis, config, progress=False).seconds["allocate"])
        for name, module in dense.items():
            replace_module(model, name, module)
    assert charged == [100.0, 100.0]
