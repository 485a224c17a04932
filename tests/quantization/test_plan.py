"""``asvd quantize --budget-mib``: bytes of every grid as written, the greedy plan, refusals before work."""

from __future__ import annotations

import pytest
import torch

from asvd_passes.errors import InvalidInputError
from asvd_passes.quantization import quantize_rtn
from asvd_passes.quantization.plan import CANDIDATES, HEAD_CANDIDATES, MIB, GridChoice, grid_bytes, greedy_plan


@pytest.mark.parametrize("shape", [(24, 200), (16, 96), (8, 576)])
def test_grid_bytes_are_the_bytes_written(shape):
    weight = torch.randn(*shape)
    for choice in (*CANDIDATES, *HEAD_CANDIDATES):
        quantized = quantize_rtn(weight, choice.bits, choice.block_size, choice.offsets)
        assert grid_bytes(shape, choice) == quantized.nbytes(), choice


def _costs(seed: int = 0):
    """Made-up costs for three matrices: each grid's cost falls as its bytes grow, at different rates."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {f"m{i}": (64, 256) for i in range(3)}
    costs = {}
    for name, shape in shapes.items():
        scale = float(torch.rand(1, generator=generator)) * 10 + 0.1
        costs[name] = {c: scale / grid_bytes(shape, c) ** 2 for c in CANDIDATES}
    return shapes, costs


def test_greedy_plan_fits_and_never_predicts_worse_than_one_grid_everywhere():
    shapes, costs = _costs()
    previous = None
    for grid in sorted(CANDIDATES, key=lambda c: grid_bytes((64, 256), c)):
        budget = sum(grid_bytes(shape, grid) for shape in shapes.values())
        plan = greedy_plan(costs, shapes, budget)
        assert sum(grid_bytes(shapes[n], c) for n, c in plan.items()) <= budget
        cost = sum(costs[n][c] for n, c in plan.items())
        assert cost <= sum(costs[n][grid] for n in shapes) + 1e-12  # the uniform plan is one it could pick
        assert previous is None or cost <= previous  # more bytes never predict worse
        previous = cost
    with pytest.raises(InvalidInputError, match="smallest plan"):
        greedy_plan(costs, shapes, 10)


def test_a_budget_below_the_smallest_plan_is_refused_before_calibration(tmp_path):
    """The refusal names the budget and the smallest plan, before reading calibration text (here: missing)."""
    from transformers import AutoTokenizer

    from conftest import make_tiny_model

    from asvd_passes.cli import main
    from asvd_passes.models import embedded_model_dir

    folder = tmp_path / "model"
    make_tiny_model("llama").save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(folder)
    code = main(["quantize", str(folder), "--out", str(tmp_path / "q"), "--budget-mib", "0.01",
                 "--calib", str(tmp_path / "no-such-file.txt")])
    assert code == 2 and not (tmp_path / "q").exists()


def test_budget_plan_end_to_end_on_a_tiny_model(tmp_path, tokens):
    """A budget between the smallest and largest plans: mixed 2/4/8-bit grids, the predicted initializer bytes
    are the export's, the file fits the budget, and ORT and onnxruntime-genai compute what PyTorch does."""
    import numpy as np

    from conftest import assert_ort_computes_the_grid, make_tiny_model
    from exporters import export_onnx
    from exporters.onnx_export import MODEL_FILE
    from asvd_passes.quantization.calibrate import quantize_model
    from asvd_passes.quantization.plan import (budget_plan, candidates_for, fixed_bytes, indicator_bytes,
                                               planned_shapes, reserved_bytes)

    model = make_tiny_model("llama")
    shapes = planned_shapes(model, "lm_head")
    assert "lm_head" in shapes and model.lm_head.weight is model.get_input_embeddings().weight  # tied: one table
    fixed = fixed_bytes(model, "lm_head")
    low = sum(min(grid_bytes(s, c) for c in candidates_for(n, "lm_head", s)) for n, s in shapes.items())
    uniform = sum(grid_bytes(s, GridChoice(4, 32)) for s in shapes.values())  # int4/32 everywhere
    budget = reserved_bytes(shapes, fixed) + (low + uniform) // 2  # forces some matrices below int4/32
    windows = tokens(4, 16, seed=9)
    plan, summary = budget_plan(model, windows, budget / MIB, "lm_head", progress=False)
    assert plan["lm_head"] in HEAD_CANDIDATES and len({plan[n] for n in shapes}) > 1
    assert summary["head"] == str(plan["lm_head"])
    assert summary["predicted_weight_bytes"] <= budget - summary["graph_reserve_bytes"]
    grids = quantize_model(model, windows, choices=plan, progress=False)
    assert {n: GridChoice(q.bits, q.block_size, q.offsets is not None) for n, q in grids.items()} == plan
    assert {c.bits for c in plan.values()} >= {2, 4}
    meta = export_onnx(model, tmp_path / "onnx", weights="int4", block_size=32, grids=grids, layout="genai")
    assert meta.quantized["quantized_bytes"] == sum(q.nbytes() for q in grids.values())  # exactly
    assert summary["predicted_weight_bytes"] == sum(q.nbytes() for q in grids.values()) + indicator_bytes(shapes, plan) \
        + fixed
    # Float initializers: at most the predicted norms and block sums (the exporter merges equal norm vectors)
    # plus a few scalar constants of the graph.
    written = meta.quantized["quantized_bytes"] + meta.quantized["float_bytes"]
    assert written <= summary["predicted_weight_bytes"] + 1024
    assert (tmp_path / "onnx" / MODEL_FILE).stat().st_size <= budget
    assert_ort_computes_the_grid(model, tmp_path / "onnx", tokens(2, 12, seed=4))
    # onnxruntime-genai runs the mixed 2/4/8-bit graph: its greedy tokens are PyTorch's (fake quant).
    pytest.importorskip("onnxruntime_genai")
    from exporters import GenAICausalLM

    prompt = tokens(1, 5, seed=2)
    greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                            pad_token_id=0).numpy()
    assert np.array_equal(GenAICausalLM(tmp_path / "onnx").generate(prompt.numpy(), max_new_tokens=32), greedy)


def test_a_head_at_block_128_is_shared_by_the_tied_embedding(tmp_path, tokens):
    """The head's coarsest grid: MatMulNBits and the embedding's GatherBlockQuantized read one int4/128 table,
    the bytes are the predicted ones and ORT computes what PyTorch does."""
    import onnx
    from transformers import AutoModelForCausalLM

    from conftest import assert_ort_computes_the_grid, tiny_config
    from exporters import export_onnx
    from exporters.onnx_export import MODEL_FILE
    from asvd_passes.quantization.calibrate import quantize_model
    from asvd_passes.quantization.plan import candidates_for, planned_shapes

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.head_dim = 128, 256, 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    shapes = planned_shapes(model, "lm_head")
    assert candidates_for("lm_head", "lm_head", shapes["lm_head"]) == HEAD_CANDIDATES
    assert candidates_for("lm_head", "lm_head", (128, 96)) == (GridChoice(4, 32),)  # blocks must divide K
    plan = {name: GridChoice(4, 32) for name in shapes} | {"lm_head": GridChoice(4, 128)}
    grids = quantize_model(model, tokens(4, 16, seed=9), choices=plan, progress=False)
    assert grids["lm_head"].block_size == 128
    meta = export_onnx(model, tmp_path / "onnx", weights="int4", block_size=32, grids=grids)
    assert meta.quantized["quantized_bytes"] == sum(q.nbytes() for q in grids.values())
    graph = onnx.load(tmp_path / "onnx" / MODEL_FILE, load_external_data=False).graph
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert [a.i for n in gathers for a in n.attribute if a.name == "block_size"] == [128]
    assert_ort_computes_the_grid(model, tmp_path / "onnx", tokens(2, 12, seed=4))
