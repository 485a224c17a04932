"""The whole-model pipeline: the model is traced and observed at once (what STRS needs).

``analyze`` does everything that does not depend on the budget (graph capture, statistics,
scaled SVDs), so one analysis serves many ratios and allocations (the quality benchmark reuses
it); ``plan`` allocates ranks; ``apply`` swaps the factored modules into the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import kv
from ..allocation import fisher_plan, measure_sensitivities, output_fisher, strs_plan
from ..allocation.strs import load_or_measure, model_fingerprint, sensitivity_key
from ..config import ASVDConfig
from ..decompose import ScaledSVD, output_root
from ..errors import InvalidInputError
from ..graph import (
    InsertObserversPass,
    RemoveObserversPass,
    capture,
    find_projections,
    group_by_input,
    output_projection_name,
)
from ..models import cache_dir
from ..modules import LowRankLinear, projection_weight, replace_module
from ..ranks import ProjectionShape, RankPlan, shapes_in_form
from ..scaling import shared_scalings
from . import planning


class NoProjectionsError(InvalidInputError):
    """The model has no linear projection that could be compressed."""


@dataclass
class Analysis:
    """What a compression learns before any budget is applied; reusable across ratios and allocations."""

    windows: torch.Tensor
    shapes: dict[str, ProjectionShape]
    statistics: dict
    svds: dict[str, ScaledSVD]
    seconds: dict[str, float]
    calibration_source: str | None
    kv_layouts: list | None = None  # attention layers of the KV pass (None: K/V left alone)
    kv_svds: dict = field(default_factory=dict)  # (attention, role, group) -> ScaledSVD
    kv_group_size: int | None = None
    _cache: dict = field(default_factory=dict)
    _cache_seconds: dict = field(default_factory=dict)

    def cached(self, key: str, compute):
        """Budget-independent sensitivities (Fisher, STRS probes): computed once per analysis."""
        if key not in self._cache:
            tick = time.perf_counter()
            self._cache[key] = compute()
            self._cache_seconds[key] = time.perf_counter() - tick
        return self._cache[key]

    def sensitivity_seconds(self, allocation: str) -> float:
        """Time spent on this allocation's sensitivities, charged to every run that uses them."""
        return self._cache_seconds.get(allocation, 0.0)

    def total_sensitivity_seconds(self) -> float:
        return sum(self._cache_seconds.values())


def untie_output_embeddings(model: nn.Module) -> None:
    """A factored LM head no longer shares the input embedding's weight: record the model as untied.

    Otherwise ``from_pretrained`` would try to tie ``lm_head.weight``, which is no longer a parameter.
    """
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return
    config.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers' cached tying map
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=False)


def select_projections(model: nn.Module, projections, config: ASVDConfig, filter_fn):
    if not projections:
        raise NoProjectionsError(f"{type(model).__name__} has no linear projections to compress")
    head = output_projection_name(model)
    selected = [
        p
        for p in projections
        if (config.include_lm_head or p.name != head)
        and (filter_fn is None or filter_fn(p.name, model.get_submodule(p.name)))
    ]
    if not selected:
        raise NoProjectionsError("No projection is left to compress after the filters")
    return selected


def lowrank_module(model: nn.Module, name: str, svd: ScaledSVD, rank: int, interpolative: bool = False) -> LowRankLinear:
    dense = model.get_submodule(name)
    weight = projection_weight(dense)
    down, up = svd.factors(rank)
    return LowRankLinear.from_factors(down, up, getattr(dense, "bias", None), dtype=weight.dtype, device=weight.device,
                                      interpolative=interpolative)


class WholeModelPipeline:
    def __init__(self, model: nn.Module, progress: bool = True):
        self.model = model
        self.progress = progress

    def analyze(self, config: ASVDConfig, windows: torch.Tensor, calibration_source, filter_fn=None) -> Analysis:
        """Everything that does not depend on the budget: graph, statistics, scaled SVDs."""
        model, progress = self.model.eval(), self.progress
        seconds: dict[str, float] = {}
        tick = time.perf_counter()
        graph_module = capture(model, windows[:1].to(model.device))
        found = find_projections(graph_module, model)
        projections = select_projections(model, found, config, filter_fn) if config.compresses_weights else []
        layouts, kv_sources = None, []
        if config.latent_kv:
            layouts = kv.find_attention_layers(model, "The KV pass (--kv-ratio)")
            kv_sources = list(dict.fromkeys(layout.source(role) for layout in layouts for role in kv.plan.ROLES))
            by_name = {p.name: p for p in found}
            missing = [name for name in kv_sources if name not in by_name]
            if missing:
                raise NoProjectionsError(f"K/V projections {missing[:3]} were not found in the traced graph")
            # K/V belong to the KV pass; the weight budget covers the other projections.
            projections = [p for p in projections if p.name not in kv_sources]
            observed = projections + [by_name[name] for name in kv_sources]
        else:
            observed = projections
        groups = group_by_input(observed)
        seconds["trace"] = time.perf_counter() - tick

        statistics = {}
        if config.statistics:
            tick = time.perf_counter()
            observe = InsertObserversPass(groups, config.statistics)
            graph_module = observe(graph_module).graph_module
            with torch.no_grad():
                for row in tqdm(windows, desc="calibrate", disable=not progress):
                    graph_module(input_ids=row[None].to(model.device), use_cache=False)
            RemoveObserversPass()(graph_module)
            statistics = observe.observers
            seconds["calibrate"] = time.perf_counter() - tick

        shapes = {p.name: ProjectionShape(p.out_features, p.in_features) for p in projections}
        # One scaled SVD per projection: any rank can be cut from it, so allocation and factoring share it.
        tick = time.perf_counter()
        scalings = shared_scalings(config.method, statistics, list(shapes) + kv_sources, config.alpha,
                                   config.asvd_statistic)
        roots, cache = {}, {}
        if config.output_whitening == "gradient" and shapes:
            covariances = output_fisher(model, list(shapes), windows[: config.sensitivity_samples], progress=progress,
                                        covariance=True)
            roots = {name: output_root(g, config.output_damping) for name, g in covariances.items()}
            if layouts is None:  # the weight plan's Fisher is the covariances' diagonal: no second set of passes
                cache["fisher"] = {name: g.diagonal().clone() for name, g in covariances.items()}
            del covariances
        svds = {}
        for name in tqdm(shapes, desc="decompose", disable=not progress):
            svds[name] = ScaledSVD.of(projection_weight(model.get_submodule(name)), scalings[name], roots.get(name))
        kv_svds, group_size = {}, None
        if layouts is not None:
            group_size = kv.resolve_group_size(layouts, config.kv_group_size)
            # The key metric needs the input Gram; without it only V is weighted.
            grams = planning.mean_grams(statistics, kv_sources) if config.kv_output_metric else None
            kv_svds = kv.group_svds(model, layouts, {name: scalings[name] for name in kv_sources}, group_size, grams)
        seconds["decompose"] = time.perf_counter() - tick
        return Analysis(
            windows, shapes, statistics, svds, seconds,
            calibration_source if isinstance(calibration_source, (str, type(None))) else "tensor",
            kv_layouts=layouts, kv_svds=kv_svds, kv_group_size=group_size, _cache=cache,
        )

    def plan(self, analysis: Analysis, config: ASVDConfig) -> tuple[RankPlan, "kv.KVPlan | None", float]:
        """Weight and KV plans for ``config``'s budget, and the seconds charged to allocation."""
        measured_before = analysis.total_sensitivity_seconds()
        tick = time.perf_counter()
        plan = self._plan(analysis, config)
        # Both plans read the dense model (sensitivities), so both are made before anything is swapped.
        kv_plan = self._kv_plan(analysis, config)
        charged = ({config.allocation} if config.compresses_weights else set()) | (
            {"fisher"} if kv_plan is not None and config.kv_allocation == "fisher" else set()
        )
        # Sensitivities measured during this call are inside the elapsed time; charge each one once.
        planning_seconds = time.perf_counter() - tick - (analysis.total_sensitivity_seconds() - measured_before)
        return plan, kv_plan, planning_seconds + sum(analysis.sensitivity_seconds(key) for key in charged)

    def apply(self, analysis: Analysis, plan: RankPlan, kv_plan) -> None:
        """Swap the factored modules (and latent attention) into the model."""
        model = self.model
        replacements = {name: lowrank_module(model, name, analysis.svds[name], rank, plan.shapes[name].interpolative)
                        for name, rank in plan.factored.items()}
        for name, module in replacements.items():
            replace_module(model, name, module)
        if output_projection_name(model) in replacements:
            untie_output_embeddings(model)
        if kv_plan is not None:
            kv.apply_kv_plan(model, analysis.kv_layouts, kv_plan, analysis.kv_svds)

    def calibrate_kv_quantizers(self, windows: torch.Tensor, config: ASVDConfig, bits: int) -> None:
        """Static scales of a quantized latent cache from the calibration windows run through the whole model."""
        model = self.model
        attentions = [m for m in model.modules() if isinstance(m, kv.LatentKVAttention)]
        device = next(model.parameters()).device

        def run():
            for window in windows:
                model(input_ids=window[None].to(device), use_cache=False)

        with torch.no_grad():
            kv.quant.calibrate_latent_quantizers(attentions, run, bits, config.kv_quant_granularity,
                                                 config.kv_quant_rotate, config.seed)

    # -- allocation --------------------------------------------------------------------------------

    def _plan(self, analysis: Analysis, config: ASVDConfig) -> RankPlan:
        """Ranks from the configured allocation (see ``planning.weight_plan``)."""
        shapes = shapes_in_form(analysis.shapes, config.interpolative)  # the budget counts what is stored

        def allocate() -> RankPlan:
            if config.allocation == "fisher":
                grams = planning.mean_grams(analysis.statistics, shapes)
                return fisher_plan(shapes, analysis.svds, self._fisher(analysis, config), grams, config.param_ratio,
                                   config.rank_multiple)
            sensitivities = analysis.cached("strs", lambda: self._strs_sensitivities(analysis, config))
            return strs_plan(shapes, sensitivities, ratio=None if config.ppl_target is not None else config.param_ratio,
                             ppl_target=config.ppl_target, multiple=config.rank_multiple)

        return planning.weight_plan(config, shapes, allocate)

    def _fisher(self, analysis: Analysis, config: ASVDConfig) -> dict:
        """Diagonal Fisher of every weight-plan projection and every K/V source, in one set of passes."""
        names = list(analysis.shapes)
        if analysis.kv_layouts:
            names += [l.source(r) for l in analysis.kv_layouts for r in kv.plan.ROLES if l.source(r) not in names]
        names = list(dict.fromkeys(names))
        sample = analysis.windows[: config.sensitivity_samples]
        return analysis.cached("fisher", lambda: output_fisher(self.model, names, sample, progress=self.progress))

    def _kv_plan(self, analysis: Analysis, config: ASVDConfig) -> "kv.KVPlan":
        return planning.kv_plan(config, analysis.kv_layouts, analysis.kv_group_size,
                       lambda: kv.plan.fisher_kv_costs(analysis.kv_layouts, analysis.kv_svds,
                                                       self._fisher(analysis, config), analysis.statistics,
                                                       analysis.kv_group_size),
                       next(self.model.parameters()).element_size())

    def _strs_sensitivities(self, analysis: Analysis, config: ASVDConfig) -> dict:
        sample = analysis.windows[: config.sensitivity_samples]
        key = sensitivity_key(
            model_fingerprint(self.model), config.method, config.alpha, config.asvd_statistic,
            config.strs_candidates, sample, analysis.windows,
        )
        return load_or_measure(
            cache_dir() / "sensitivities" / f"{key}.json",
            lambda: measure_sensitivities(
                self.model, analysis.shapes, lambda name, rank: lowrank_module(self.model, name, analysis.svds[name], rank),
                sample, config.strs_candidates, config.rank_multiple, self.progress,
            ),
        )
