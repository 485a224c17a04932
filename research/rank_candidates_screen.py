"""Would rank-r factors ever be chosen by ``asvd quantize --budget-mib``? (issue 22, item 2)

The byte-budget plan (``asvd_passes/quantization/plan.py``) prices each matrix's candidate grids by the predicted
loss increase ½ Σ F_c E[x_k²] ΔW_ck² and spends the budget greedily over each matrix's lower convex hull of
(bytes, cost). This screen adds rank-r candidates to every matrix, priced by the same model at their best:

- the factors minimise that very cost (the SVD of diag(√F)·W·diag(√E[x²]), truncated, unscaled: the optimal
  rank-r matrix under the plan's diagonal weighting), then each factor is rounded to an int4 or int8 MatMulNBits
  grid (block 32, round to nearest, as the plan rounds its grid candidates);
- their bytes are the two factors' bytes as the export writes them (``grid_bytes`` of each).

It counts how many matrices have a rank-r candidate on their hull, and plans the SmolLM2 budgets of issue 22
with and without them (predicted loss and what is chosen). With ``--measure``, the plans at MEASURED_MIB are
built as ``asvd quantize --budget-mib`` builds them (each rank-r matrix a ``LowRankLinear`` of those factors,
GPTQ onto every grid, factors included, calibrated on 16 × 512 validation windows) and their perplexity is
measured in PyTorch (the model holds the dequantized grid values) on the usual protocol.

    python research/rank_candidates_screen.py              # writes research/results/rank_candidates_screen.md
    python research/rank_candidates_screen.py --measure    # writes research/results/rank_candidates_measured.md
    python research/rank_candidates_screen.py --measure --covariance   # ..._measured_covariance.md (70.1 MiB)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75)  # of min(out, in)
BUDGETS_MIB = (60.0, 70.1, 82.5, 108.4)
MEASURED_MIB = (70.1, 60.0)


@dataclass(frozen=True)
class RankChoice:
    fraction: float
    bits: int
    block_size: int = 32
    offsets: bool = False

    def rank(self, shape) -> int:
        return max(1, round(self.fraction * min(shape)))

    def __str__(self) -> str:
        return f"rank {self.fraction:g} int{self.bits}"


def main() -> int:
    from asvd_passes.data import random_windows, read_text, tokenize
    from asvd_passes.models import load_model_and_tokenizer
    from asvd_passes.quantization import plan
    from asvd_passes.quantization.matmul_nbits import quantize_rtn

    grid_bytes, rounding_cost, candidates_for = plan.grid_bytes, plan.rounding_cost, plan.candidates_for
    factors = {}  # id(weight) → (U·√S, √S·Vᵀ) unscaled, full rank, from the weighted SVD

    def rank_bytes(shape, choice):
        if not isinstance(choice, RankChoice):
            return grid_bytes(shape, choice)
        n, k = shape
        r, grid = choice.rank(shape), plan.GridChoice(choice.bits, choice.block_size)
        return grid_bytes((r, k), grid) + grid_bytes((n, r), grid)

    # --covariance: every candidate (grids too) priced with each input's whole covariance Σ = E[x·xᵀ],
    # ½ Σ_c F_c ΔW_c Σ ΔW_cᵀ, and the factors from the SVD of diag(√F)·W·L (Σ = L·Lᵀ): the optimal rank-r matrix
    # under that cost (SVD-LLM's whitening with the plan's output weights).
    covariance = "--covariance" in sys.argv
    grams = {}  # id(weight) → [Σ x·xᵀ, tokens]
    input_power = plan._input_power

    def power_and_grams(model, linears):
        sums, counts, handles = input_power(model, linears)
        for module in linears.values() if covariance else ():
            grams[id(module.weight)] = [torch.zeros(module.in_features, module.in_features, dtype=torch.float64), 0]

            def record(module, args, key=id(module.weight)):
                flat = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                grams[key][0] += flat.T @ flat
                grams[key][1] += flat.shape[0]
            handles.append(module.register_forward_pre_hook(record))
        return sums, counts, handles

    plan._input_power = power_and_grams

    def sigma_of(weight):
        total, tokens = grams[id(weight)]
        sigma = total / max(tokens, 1)
        return sigma + 1e-6 * sigma.diagonal().mean() * torch.eye(sigma.shape[0], dtype=sigma.dtype)

    def cost_of(delta, weight, fisher, input_power):
        if covariance:
            return 0.5 * float(fisher.double().cpu() @ ((delta @ sigma_of(weight)) * delta).sum(1))
        return 0.5 * float(fisher.double().cpu() @ (delta.pow(2) @ input_power.double().cpu()))

    def rank_cost(weight, fisher, input_power, choice):
        w = weight.detach().double().cpu()
        if not isinstance(choice, RankChoice):
            if not covariance:
                return rounding_cost(weight, fisher, input_power, choice)
            delta = quantize_rtn(weight, choice.bits, choice.block_size, choice.offsets).dequantize().double() - w
            return cost_of(delta, weight, fisher, input_power)
        if id(weight) not in factors:
            left = fisher.double().cpu().clamp(min=1e-30).sqrt()
            if covariance:
                lower = torch.linalg.cholesky(sigma_of(weight))
                u, s, vt = torch.linalg.svd(left[:, None] * w @ lower, full_matrices=False)
                down = torch.linalg.solve_triangular(lower, s.sqrt()[:, None] * vt, upper=False, left=False)  # ·L⁻¹
                factors[id(weight)] = ((u * s.sqrt()) / left[:, None], down)
            else:
                right = input_power.double().cpu().clamp(min=1e-30).sqrt()
                u, s, vt = torch.linalg.svd(left[:, None] * w * right[None, :], full_matrices=False)
                factors[id(weight)] = ((u * s.sqrt()) / left[:, None], (s.sqrt()[:, None] * vt) / right[None, :])
        up, down = factors[id(weight)]
        r = choice.rank(tuple(w.shape))
        up_q = quantize_rtn(up[:, :r].float(), choice.bits, choice.block_size, False).dequantize().double()
        down_q = quantize_rtn(down[:r].float(), choice.bits, choice.block_size, False).dequantize().double()
        return cost_of(up_q @ down_q - w, weight, fisher, input_power)

    with_ranks = {"on": False}

    def ranked_candidates(name, head_name, shape):
        grids = candidates_for(name, head_name, shape)
        if not with_ranks["on"] or name == head_name:
            return grids
        return grids + tuple(RankChoice(f, b) for f in FRACTIONS for b in (4, 8))

    plan.grid_bytes, plan.rounding_cost, plan.candidates_for = rank_bytes, rank_cost, ranked_candidates

    model, tokenizer = load_model_and_tokenizer(None)
    valid = tokenize(tokenizer, read_text(str(DATA / "wiki.valid.tokens")))
    windows = random_windows(valid, 16, 512, 0, "calibration")[:4]  # the sensitivity windows asvd quantize uses
    head = "lm_head"
    costs_seen = {}
    original_greedy = plan.greedy_plan

    def recording_greedy(costs, shapes, budget):
        costs_seen.update(costs)
        return original_greedy(costs, shapes, budget)

    plan.greedy_plan = recording_greedy
    rows = []
    for budget in () if "--measure" in sys.argv else BUDGETS_MIB:
        for on in (False, True):
            with_ranks["on"] = on
            chosen, summary = plan.budget_plan(model, windows, budget, head, progress=False)
            ranked = sum(isinstance(c, RankChoice) for c in chosen.values())
            rows.append(dict(budget=budget, ranks=on, cost=summary["predicted_cost"], ranked=ranked,
                             predicted_mib=summary["predicted_weight_bytes"] / 2**20))
            print(rows[-1], flush=True)
    shapes = plan.planned_shapes(model, head)
    on_hull = 0
    for name, by_choice in costs_seen.items():
        hull = plan.lower_convex_hull(sorted((rank_bytes(shapes[name], c), cost, c) for c, cost in by_choice.items()))
        on_hull += any(isinstance(c, RankChoice) for *_, c in hull)
    measured = []
    if "--measure" in sys.argv:
        from asvd_passes import perplexity
        from asvd_passes.modules import LowRankLinear, replace_module
        from asvd_passes.quantization.calibrate import quantize_model

        calibration = random_windows(valid, 16, 512, 0, "calibration")
        for budget in MEASURED_MIB[:1] if covariance else MEASURED_MIB:
            for on in (False, True):
                model, tokenizer = load_model_and_tokenizer(None)
                factors.clear(), grams.clear()
                with_ranks["on"] = on
                chosen, _ = plan.budget_plan(model, windows, budget, head, progress=False)
                grids = {}
                for name, choice in chosen.items():
                    if not isinstance(choice, RankChoice):
                        grids[name] = choice
                        continue
                    linear = model.get_submodule(name)
                    up, down = factors[id(linear.weight)]
                    r = choice.rank(tuple(linear.weight.shape))
                    replace_module(model, name, LowRankLinear.from_factors(
                        down[:r].float(), up[:, :r].float(), linear.bias, torch.float32, "cpu"))
                    grids[f"{name}.down"] = grids[f"{name}.up"] = plan.GridChoice(choice.bits, choice.block_size)
                quantized = quantize_model(model, calibration, choices=grids, progress=False)
                ppl = perplexity(model, tokenizer, str(DATA / "wiki.test.raw"), 512, 30, progress=False)["ppl"]
                weight_mib = (sum(q.nbytes() for q in quantized.values()) + plan.fixed_bytes(model, head)) / 2**20
                measured.append(dict(budget=budget, ranks=on, ranked=sum(isinstance(c, RankChoice) for c in chosen.values()),
                                     ppl=ppl, weight_mib=weight_mib))
                print(measured[-1], flush=True)
    lines = [
        "SmolLM2-135M-Instruct (the embedded Q4_1 GGUF, dequantized); the `--budget-mib` plan's cost model "
        "(diagonal output Fisher on 4 × 512 validation windows, seed 0; E[x²] of each input; round-to-nearest); "
        f"rank-r candidates at {', '.join(map(str, FRACTIONS))} of min(out, in), factors int4 or int8 block 32, "
        "from the SVD that minimises the plan's own weighted error.",
        "",
        f"Matrices with a rank-r candidate on their (bytes, predicted loss) lower convex hull: **{on_hull} of "
        f"{len(costs_seen)}** (the LM head keeps its grid candidates).",
        "",
        "| budget MiB | rank-r candidates | matrices planned rank-r | predicted loss | predicted MiB |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['budget']} | {'yes' if r['ranks'] else 'no'} | {r['ranked']} | {r['cost']:.4f} | "
              f"{r['predicted_mib']:.2f} |" for r in rows]
    if measured:
        lines = ["Built and measured (GPTQ onto the planned grids, factors included; perplexity in PyTorch on "
                  "wiki.test.raw, seqlen 512, 30 windows; weight MiB: the grids' bytes as exported plus norms "
                  "and the embedding, without block-sum matrices and the graph):", "",
                  "| budget MiB | rank-r candidates | matrices rank-r | perplexity | weight MiB |", "|---|---|---|---|---|"]
        out = ROOT / "research" / "results" / f"rank_candidates_measured{'_covariance' if covariance else ''}.md"
        if covariance:
            lines[0] = lines[0].replace("Built and measured", "Every candidate priced with each input's whole covariance "
                                        "(`--covariance`); built and measured")
        out.write_text("\n".join(lines + [f"| {m['budget']} | {'yes' if m['ranks'] else 'no'} | {m['ranked']} | "
                                           f"{m['ppl']:.2f} | {m['weight_mib']:.2f} |" for m in measured]) + "\n")
        print(out.read_text())
        return 0
    out = ROOT / "research" / "results" / "rank_candidates_screen.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
