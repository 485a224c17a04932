import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from asvd_passes.allocation.block_cache import BlockReplay, block_index
from asvd_passes.allocation.strs import candidate_rank, load_or_measure, measure_sensitivities, sensitivity_key, strs_plan
from asvd_passes.ranks import ProjectionShape

SHAPES = {"a": ProjectionShape(64, 64), "b": ProjectionShape(64, 64)}
# "a" is robust (low probe perplexity), "b" is sensitive.
SENS = {"a": {"0.4": 11.0, "0.5": 10.5, "0.9": 10.1}, "b": {"0.4": 40.0, "0.5": 30.0, "0.9": 12.0}}


def test_threshold_prefers_robust_projection_and_meets_budget():
    plan = strs_plan(SHAPES, SENS, ratio=0.6)
    assert plan.ratio <= 0.6
    assert plan.ranks["a"] is not None and plan.ranks["a"] <= candidate_rank(SHAPES["a"], 0.5)


def test_ppl_target_mode_uses_target_as_threshold():
    plan = strs_plan(SHAPES, SENS, ppl_target=10.6)
    assert plan.ranks["a"] == candidate_rank(SHAPES["a"], 0.5)
    assert plan.ranks["b"] is None


def test_unreachable_ratio_is_a_clear_error():
    with pytest.raises(ValueError, match="below what the STRS candidates can reach"):
        strs_plan(SHAPES, SENS, ratio=0.1)


def test_sensitivity_cache_key_covers_inputs(tmp_path):
    windows = torch.arange(12).reshape(2, 6)
    base = sensitivity_key("h", "asvd", 0.5, "abs_mean", (0.4, 0.5), windows, windows)
    assert base != sensitivity_key("h2", "asvd", 0.5, "abs_mean", (0.4, 0.5), windows, windows)
    assert base != sensitivity_key("h", "whiten", 0.5, "abs_mean", (0.4, 0.5), windows, windows)
    assert base != sensitivity_key("h", "asvd", 1.0, "abs_mean", (0.4, 0.5), windows, windows)
    assert base != sensitivity_key("h", "asvd", 0.5, "abs_mean", (0.4,), windows, windows)
    assert base != sensitivity_key("h", "asvd", 0.5, "abs_mean", (0.4, 0.5), windows + 1, windows)
    calls = []
    cache = tmp_path / "s.json"
    first = load_or_measure(cache, lambda: calls.append(1) or {"x": {"0.5": 1.0}})
    second = load_or_measure(cache, lambda: calls.append(1) or {"x": {"0.5": 2.0}})
    assert first == second == json.loads(cache.read_text()) and calls == [1]


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(config).eval()


def test_block_replay_matches_full_forward_after_a_change():
    model = tiny_llama()
    windows = torch.randint(0, 128, (2, 16))
    replay = BlockReplay(model, windows)
    assert all(abs(replay.loss_from(i) - replay.dense_loss) < 1e-6 for i in range(3))
    with torch.no_grad():
        for p in replay.layers[2].parameters():
            p.mul_(0.5)
    changed = replay.loss_from(0)
    assert abs(replay.loss_from(2) - changed) < 1e-6 and abs(changed - replay.dense_loss) > 1e-5
    assert block_index(model, "model.layers.2.mlp.down_proj") == 2


def test_probes_restore_the_model():
    from asvd_passes.modules import LowRankLinear

    model = tiny_llama()
    names = ["model.layers.0.mlp.down_proj", "model.layers.2.self_attn.q_proj"]
    shapes = {n: ProjectionShape(*model.get_submodule(n).weight.shape) for n in names}

    def truncated(name, rank):
        w = model.get_submodule(name).weight.detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return LowRankLinear.from_factors(vh[:rank] * s[:rank, None], u[:, :rank], None, torch.float32, "cpu")

    before = [model.get_submodule(n) for n in names]
    sens = measure_sensitivities(model, shapes, truncated, torch.randint(0, 128, (2, 16)), (0.4, 0.9), progress=False)
    assert [model.get_submodule(n) for n in names] == before
    assert set(sens) == set(names) and all(set(v) == {"0.4", "0.9"} for v in sens.values())
