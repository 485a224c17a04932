"""Bits, block size and block offsets per matrix under one byte budget (``asvd quantize --budget-mib``).

Every decoder-block ``Linear`` picks one grid among :data:`CANDIDATES`; the LM head (which a tied
embedding shares, so integer zero points only) among :data:`HEAD_CANDIDATES`. A candidate's bytes are what the export writes for it
(:func:`grid_bytes`, equal to ``BlockQuantized.nbytes()``); its cost is the predicted loss increase of
rounding the matrix to that grid, with the diagonal Fisher of the projection's output (as the rank
allocator, :mod:`..allocation.sensitivity`) and the mean square of each input channel:

    cost = ½ · Σ_{c,k} F_c · E[x_k²] · ΔW_{ck}²,   ΔW = round-to-grid(W) − W

(round to nearest; GPTQ then lowers every matrix's error, roughly in proportion). A tied head's cost
leaves out what the same rounding does to the embedding rows. A greedy pass spends
the budget where a byte buys the most predicted loss, on each matrix's lower convex hull, so plain
int4 block 32 everywhere is one plan it can choose and never predicts worse than at its bytes.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidInputError
from .matmul_nbits import quantize_rtn

MIB = 2**20
# What the export writes besides the weights: the graph itself, RoPE and shape constants (≈ 0.3 MiB for
# SmolLM2-135M once the exporter's debug annotations are dropped). Reserved out of the budget.
GRAPH_RESERVE = MIB // 2


@dataclass(frozen=True)
class GridChoice:
    bits: int
    block_size: int
    offsets: bool = False

    def __str__(self) -> str:
        return f"int{self.bits}/{self.block_size}{'+offsets' if self.offsets else ''}"


# 2-bit grids let a budget go below int4 everywhere (MatMulNBits takes 2, 4 and 8 bits on CPU); 8-bit and
# offset grids buy quality back where a byte buys the most.
CANDIDATES = (GridChoice(2, 128), GridChoice(2, 64), GridChoice(2, 32), GridChoice(4, 128), GridChoice(4, 64),
              GridChoice(4, 32), GridChoice(4, 64, True), GridChoice(4, 32, True), GridChoice(8, 32))
# The LM head: integer zero points (a tied embedding's GatherBlockQuantized reads the same tensors).
HEAD_CANDIDATES = (GridChoice(4, 128), GridChoice(4, 64), GridChoice(4, 32))
# An untied embedding is exported by ORT's quantizer at int4, block 32.
EMBEDDING = GridChoice(4, 32)


def grid_bytes(shape: tuple[int, int], choice: GridChoice) -> int:
    """Bytes of a (N × K) matrix on ``choice`` as exported: packed codes, float32 scales, packed zero points,
    float32 offsets (the same count as :func:`.matmul_nbits.packed` plus the offsets)."""
    n, k = shape
    blocks = math.ceil(k / choice.block_size)
    codes = n * blocks * choice.block_size * choice.bits // 8
    zeros = n * math.ceil(blocks * choice.bits / 8)  # packed 8/bits per byte
    return codes + 4 * n * blocks + zeros + (4 * n * blocks if choice.offsets else 0)


def candidates_for(name: str, head_name: str | None, shape: tuple[int, int]) -> tuple[GridChoice, ...]:
    """The grids ``name`` may take; the head's blocks must divide its input width (GatherBlockQuantized's rule)."""
    if name != head_name:
        return CANDIDATES
    return tuple(c for c in HEAD_CANDIDATES if shape[1] % c.block_size == 0) or HEAD_CANDIDATES


def fixed_bytes(model: nn.Module, head_name: str | None) -> int:
    """Bytes the export writes that no choice changes: an untied embedding (int4/32; a tied one reads the
    head's tensors) and every other float parameter (norms, biases)."""
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    embedding = model.get_input_embeddings().weight
    head = model.get_submodule(head_name) if head_name else None
    total = 0
    if head is None or head.weight is not embedding:
        total += grid_bytes(tuple(embedding.shape), EMBEDDING)
    counted = {id(embedding)} | ({id(head.weight)} if head is not None else set())
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if id(param) not in counted and not (owner in linears and name.endswith(".weight")):
            total += param.numel() * 4
    return total


def indicator_bytes(shapes: dict[str, tuple[int, int]], plan: dict[str, GridChoice] | None = None) -> int:
    """Bytes of the offset grids' block-sum matrices (K × blocks float32, one per input width and block size)
    that ``plan`` needs, or that any plan could need (``plan`` None: every width at every offset candidate)."""
    if plan is None:
        pairs = {(shape[1], c.block_size) for shape in shapes.values() for c in CANDIDATES if c.offsets}
    else:
        pairs = {(shapes[name][1], c.block_size) for name, c in plan.items() if c.offsets and name in shapes}
    return sum(4 * k * math.ceil(k / block) for k, block in pairs)


def reserved_bytes(shapes: dict[str, tuple[int, int]], fixed: int) -> int:
    """What the budget sets aside before choosing: the fixed bytes, the graph, the largest block-sum matrices."""
    return fixed + GRAPH_RESERVE + indicator_bytes(shapes)


def plan_bytes(shapes: dict[str, tuple[int, int]], plan: dict[str, GridChoice]) -> int:
    return sum(grid_bytes(shapes[name], choice) for name, choice in plan.items())


def smallest_plan_bytes(shapes: dict[str, tuple[int, int]], head_name: str | None = None) -> int:
    return sum(min(grid_bytes(shape, c) for c in candidates_for(name, head_name, shape)) for name, shape in shapes.items())


def check_budget(budget: int, shapes: dict[str, tuple[int, int]], fixed: int, head_name: str | None = None) -> None:
    """A clear error, before any work, for a budget no plan fits (``shapes``: the head's too, if it is planned)."""
    least = smallest_plan_bytes(shapes, head_name) + reserved_bytes(shapes, fixed)
    if budget < least:
        smallest = min(CANDIDATES, key=lambda c: grid_bytes((64, 1024), c))
        raise InvalidInputError(
            f"a budget of {budget / MIB:.2f} MiB is below the smallest plan ({least / MIB:.2f} MiB: every matrix at "
            f"{smallest}, the LM head at {min(HEAD_CANDIDATES, key=lambda c: grid_bytes((64, 1024), c))}, "
            "norms and graph)")


def rounding_cost(weight: torch.Tensor, fisher: torch.Tensor, input_power: torch.Tensor, choice: GridChoice) -> float:
    """½ Σ F_c E[x_k²] ΔW_ck² for rounding ``weight`` to ``choice`` (the module docstring)."""
    delta = quantize_rtn(weight, choice.bits, choice.block_size, choice.offsets).dequantize() - weight.detach().float().cpu()
    return 0.5 * float(fisher.double().cpu() @ (delta.double().pow(2) @ input_power.double().cpu()))


def lower_convex_hull(points: list[tuple]) -> list[tuple]:
    """The lower convex hull of (bytes, cost, ...) points sorted by bytes, cost decreasing along it: the candidates
    a greedy spender of bytes can step through."""
    hull = []
    for point in points:
        if hull and point[1] >= hull[-1][1]:
            continue
        while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) * (point[0] - hull[-2][0]) >= \
                (point[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0]):
            hull.pop()
        hull.append(point)
    return hull


def greedy_plan(costs: dict[str, dict[GridChoice, float]], shapes: dict[str, tuple[int, int]],
                budget: int) -> dict[str, GridChoice]:
    """Cheapest candidate everywhere, then the upgrade with the most predicted loss saved per byte, while it fits."""
    hulls = {name: lower_convex_hull(sorted((grid_bytes(shapes[name], c), cost, c) for c, cost in by_choice.items()))
             for name, by_choice in costs.items()}
    position = {name: 0 for name in hulls}
    spent = sum(hull[0][0] for hull in hulls.values())
    if spent > budget:
        raise InvalidInputError(f"the budget leaves {budget} bytes for the matrices; the smallest plan needs {spent}")
    queue = []

    def push(name):
        hull, at = hulls[name], position[name]
        if at + 1 < len(hull):
            gain = (hull[at][1] - hull[at + 1][1]) / (hull[at + 1][0] - hull[at][0])
            heapq.heappush(queue, (-gain, name))

    for name in hulls:
        push(name)
    while queue:
        _, name = heapq.heappop(queue)
        hull, at = hulls[name], position[name]
        extra = hull[at + 1][0] - hull[at][0]
        if spent + extra > budget:
            continue  # this step does not fit; a cheaper step elsewhere may
        spent += extra
        position[name] = at + 1
        push(name)
    return {name: hulls[name][position[name]][2] for name in hulls}


@torch.no_grad()
def _input_power(model: nn.Module, linears: dict[str, nn.Linear]):
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook(name):
        def record(module, args):
            flat = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] += flat.pow(2).sum(0).cpu()
            counts[name] += flat.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    return sums, counts, handles


def planned_shapes(model: nn.Module, head_name: str | None) -> dict[str, tuple[int, int]]:
    """(N, K) of every matrix a plan chooses a grid for: each decoder-block ``Linear`` and the LM head."""
    from ..allocation.block_cache import decoder_layers

    layers = decoder_layers(model)
    shapes = {name: tuple(m.weight.shape) for name, m in model.named_modules() if type(m) is nn.Linear
              and any(m is sub for layer in layers for sub in layer.modules())}
    if head_name:
        shapes[head_name] = tuple(model.get_submodule(head_name).weight.shape)
    return shapes


def budget_plan(model: nn.Module, windows: torch.Tensor, budget_mib: float, head_name: str | None,
                progress: bool = True) -> tuple[dict[str, GridChoice], dict]:
    """The grid of every decoder-block ``Linear`` and of the head for a file of ``budget_mib`` MiB; also a
    summary (predicted bytes, choices counted). ``windows``: the sensitivity windows."""
    from tqdm.auto import tqdm

    from ..allocation.sensitivity import output_fisher

    shapes = planned_shapes(model, head_name)
    linears = {name: model.get_submodule(name) for name in shapes}
    budget = int(budget_mib * MIB)
    fixed = fixed_bytes(model, head_name)
    check_budget(budget, shapes, fixed, head_name)
    sums, counts, handles = _input_power(model, linears)
    try:
        fisher = output_fisher(model, list(linears), windows, progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    costs = {}
    for name in tqdm(linears, desc="grid costs", disable=not progress):
        power = sums[name] / max(counts[name], 1)
        costs[name] = {c: rounding_cost(linears[name].weight, fisher[name], power, c)
                       for c in candidates_for(name, head_name, shapes[name])}
    plan = greedy_plan(costs, shapes, budget - reserved_bytes(shapes, fixed))
    chosen = {str(c): sum(1 for name in shapes if plan[name] == c and name != head_name) for c in CANDIDATES}
    summary = {"budget_bytes": budget,
               # every initializer the export writes (weights, scales, zero points, offsets, norms, block sums)
               "predicted_weight_bytes": plan_bytes(shapes, plan) + fixed + indicator_bytes(shapes, plan),
               "graph_reserve_bytes": GRAPH_RESERVE,
               "choices": {k: v for k, v in chosen.items() if v},
               "head": str(plan[head_name]) if head_name else None,
               "predicted_cost": sum(costs[name][plan[name]] for name in shapes)}
    return plan, summary
