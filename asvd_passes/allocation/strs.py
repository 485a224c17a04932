"""ASVD's sensitivity-based truncation-rank search (STRS), with an exact parameter count.

1. For every projection and candidate ratio ρ (default 0.4…0.9), the calibration perplexity with
   only that projection truncated to r = floor(ρ·in·out/(in+out)) (probes replay the cached
   outputs of earlier blocks, see :mod:`.block_cache`).
2. A threshold τ over those perplexities: each projection takes its smallest candidate whose
   probe stayed ≤ τ (dense if none). τ is binary-searched over the sorted probe values so the
   exact parameter count (real ranks) meets the target; a ``ppl_target`` uses τ = target directly.
3. The probes are cached on disk under a key of everything they depend on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..errors import InvalidInputError
from ..ranks import ProjectionShape, RankPlan
from .block_cache import BlockReplay, block_index

DEFAULT_CANDIDATES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def candidate_rank(shape: ProjectionShape, ratio: float, multiple: int = 1) -> int:
    rank = shape.rank_for_params(ratio * shape.dense_params)
    return max(multiple, rank - rank % multiple)


def model_fingerprint(model) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sensitivity_key(model_hash: str, method: str, alpha: float, statistic: str, candidates, windows, stats_windows) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"model": model_hash, "method": method, "alpha": alpha, "statistic": statistic,
                              "candidates": list(candidates)}, sort_keys=True).encode())
    for tensor in (windows, stats_windows):  # covers calibration text, seed and seqlen
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def measure_sensitivities(
    model,
    shapes: dict[str, ProjectionShape],
    truncated: Callable[[str, int], torch.nn.Module],
    windows: torch.Tensor,
    candidates=DEFAULT_CANDIDATES,
    multiple: int = 1,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """``{name: {str(ratio): calibration ppl with only that projection truncated}}``."""
    from ..modules import replace_module

    replay = BlockReplay(model, windows)
    result: dict[str, dict[str, float]] = {}
    bar = tqdm(total=len(shapes) * len(candidates), desc="STRS probes", disable=not progress)
    for name, shape in shapes.items():
        start = block_index(model, name)
        original = model.get_submodule(name)
        result[name] = {}
        for ratio in candidates:
            probe = truncated(name, candidate_rank(shape, ratio, multiple))  # built from the dense module
            replace_module(model, name, probe)
            try:
                result[name][str(ratio)] = replay.ppl_from(start)
            finally:
                replace_module(model, name, original)
            bar.update()
    bar.close()
    return result


def load_or_measure(cache_file: Path | None, measure: Callable[[], dict]) -> dict:
    if cache_file is not None and cache_file.is_file():
        return json.loads(cache_file.read_text())
    result = measure()
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, sort_keys=True))
        tmp.replace(cache_file)
    return result


def _plan_at(shapes, sensitivities, threshold: float, multiple: int) -> RankPlan:
    plan = RankPlan(shapes, {name: None for name in shapes})
    for name, probes in sensitivities.items():
        allowed = [float(ratio) for ratio, ppl in probes.items() if ppl <= threshold]
        if allowed:
            plan.ranks[name] = candidate_rank(shapes[name], min(allowed), multiple)
    return plan


def strs_plan(
    shapes: dict[str, ProjectionShape],
    sensitivities: dict[str, dict[str, float]],
    ratio: float | None = None,
    ppl_target: float | None = None,
    multiple: int = 1,
) -> RankPlan:
    """Threshold the probes to meet ``ratio`` (exactly, from real ranks) or ``ppl_target``."""
    if ppl_target is not None:
        return _plan_at(shapes, sensitivities, ppl_target, multiple)
    if ratio is None or not 0.0 < ratio <= 1.0:
        raise ValueError(f"param_ratio must lie in (0, 1], got {ratio}")
    values = sorted({ppl for probes in sensitivities.values() for ppl in probes.values()})
    low, high = 0, len(values) - 1
    if _plan_at(shapes, sensitivities, values[high], multiple).ratio > ratio:
        raise InvalidInputError(
            f"param_ratio {ratio} is below what the STRS candidates can reach "
            f"({_plan_at(shapes, sensitivities, values[high], multiple).ratio:.3f}); add smaller candidate ratios"
        )
    while low < high:  # smallest threshold whose plan fits the budget
        mid = (low + high) // 2
        if _plan_at(shapes, sensitivities, values[mid], multiple).ratio <= ratio:
            high = mid
        else:
            low = mid + 1
    plan = _plan_at(shapes, sensitivities, values[low], multiple)
    return _fill_budget(plan, shapes, sensitivities, values[low], ratio, multiple)


def _fill_budget(plan: RankPlan, shapes, sensitivities, threshold, ratio, multiple) -> RankPlan:
    """Give back the budget overshoot to the projection(s) admitted last (those probed at τ itself)."""
    budget = ratio * plan.original_params
    boundary = [name for name, probes in sensitivities.items() if threshold in probes.values()]
    for name in boundary:
        rank = plan.ranks[name]
        if rank is None:
            continue
        shape = shapes[name]
        spare = budget - plan.total_kept_params
        extra = shape.rank_for_params(plan.kept_params(name) + spare) - rank
        extra -= extra % multiple
        plan.ranks[name] = min(rank + max(extra, 0), shape.top_saving_rank)
    return plan
