"""``ASVDCompressor``: the pipeline that ties the passes together (Optimum ``OptimumQuantizer`` style).

model → graph (torch.export) → projections/groups → observed graph + calibration → statistics
→ rank plan → scaled SVD factors → ``LowRankLinear`` modules swapped into the model → saved folder.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from optimum.quantization_base import OptimumQuantizer
from torch import nn
from tqdm.auto import tqdm

from .config import ASVDConfig
from .data import calibration_windows
from .decompose import ScaledSVD
from .errors import InvalidInputError
from .graph import (
    InsertObserversPass,
    RemoveObserversPass,
    capture,
    find_projections,
    group_by_input,
    output_projection_name,
)
from .hf_quantizer import ASVDQuantizationConfig
from .plots import plot_ranks
from .modules import LowRankLinear, parameter_count, projection_weight, replace_module
from .allocation import fisher_plan, measure_sensitivities, output_fisher, strs_plan
from .allocation.strs import load_or_measure, model_fingerprint, sensitivity_key
from .models import cache_dir
from .ranks import ProjectionShape, RankPlan, explicit_plan, uniform_ratio_plan
from . import kv
from .allocation.fisher import loss_cost_curve
from .scaling import build_scaling
from .serialization import atomic_directory, write_json

REPORT_FILE = "asvd_report.json"
RANKS_PLOT = "ranks.png"


class NoProjectionsError(InvalidInputError):
    """The model has no linear projection that could be compressed."""


@dataclass
class CompressionReport:
    method: str
    allocation: str
    ranks: dict[str, int | None]
    max_ranks: dict[str, int]  # min(in, out) per selected projection
    selected_ratio: float  # kept / original weights of the selected projections
    model_ratio: float  # parameters after / before, whole model
    selected_params_before: int
    selected_params_after: int
    model_params_before: int
    model_params_after: int
    calibration_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float = 0.0
    kv: dict | None = None  # latent KV cache: plan, achieved ratios (None when K/V were left alone)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        factored = sum(r is not None for r in self.ranks.values())
        kv_line = ""
        if self.kv is not None:
            kv_line = (
                f"latent KV cache: ratio {self.kv['kv_ratio']:.4f} (K {self.kv['key_ratio']:.3f}, "
                f"V {self.kv['value_ratio']:.3f}, group size {self.kv['group_size']}); "
            )
        return (
            f"{factored}/{len(self.ranks)} projections factored; ratio {self.selected_ratio:.4f} of selected "
            f"projections, {self.model_ratio:.4f} of the whole model; " + kv_line +
            f"compression {self.seconds.get('compress', 0):.1f} s, peak RSS {self.peak_rss_mib:.0f} MiB"
        )


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


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _model_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # .parameters() counts tied weights once


def _untie_output_embeddings(model: nn.Module) -> None:
    """A factored LM head no longer shares the input embedding's weight: record the model as untied.

    Otherwise ``from_pretrained`` would try to tie ``lm_head.weight``, which is no longer a parameter.
    """
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return
    config.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers' cached tying map
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=False)


class ASVDCompressor(OptimumQuantizer):
    """Compress a transformers causal LM with (activation-aware) SVD.

    >>> compressor = ASVDCompressor.from_pretrained("path/or/hub-id")
    >>> report = compressor.compress(ASVDConfig(method="whiten", param_ratio=0.9), save_dir="out")
    """

    def __init__(self, model: nn.Module, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, model_or_path=None, file_name: str | None = None, dtype=torch.float32):
        """``model_or_path``: a model object, a folder, a hub id, a ``.gguf`` file, or ``None`` (embedded)."""
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path)
        from .models import load_model_and_tokenizer

        source = model_or_path
        if file_name is not None:
            source = str(Path(model_or_path) / file_name)
        model, tokenizer = load_model_and_tokenizer(source, dtype=dtype)
        return cls(model, tokenizer)

    def quantize(self, save_dir, **kwargs):
        """Optimum's entry point: same as :meth:`compress` (which writes a whole folder: no ``file_prefix``)."""
        return self.compress(save_dir=save_dir, **kwargs)

    def compress(
        self,
        config: ASVDConfig | None = None,
        calibration: str | torch.Tensor | None = None,
        save_dir: str | Path | None = None,
        filter_fn: Callable[[str, nn.Module], bool] | None = None,
        progress: bool = True,
    ) -> CompressionReport:
        """Compress ``self.model`` in place; write ``save_dir`` (atomically) when given.

        ``calibration`` overrides ``config.calibration``: a source string or a ready (n, seqlen) tensor
        of token ids. ``filter_fn(name, module)`` narrows which projections are compressed.
        """
        config = config or ASVDConfig()
        analysis = self.analyze(config, calibration, filter_fn, progress)
        return self.apply(analysis, config, save_dir=save_dir, progress=progress)

    def analyze(self, config: ASVDConfig, calibration=None, filter_fn=None, progress: bool = True) -> "Analysis":
        """Everything that does not depend on the budget: calibration, graph, statistics, scaled SVDs."""
        config.validate()
        model = self.model.eval()
        if any(isinstance(m, (LowRankLinear, kv.LatentKVAttention)) for m in model.modules()):
            raise InvalidInputError("This model is already ASVD-compressed; compress the original model instead")
        start = time.perf_counter()
        seconds: dict[str, float] = {}

        windows = self._calibration(config, calibration)
        seconds["calibration_data"] = time.perf_counter() - start

        tick = time.perf_counter()
        graph_module = capture(model, windows[:1].to(model.device))
        found = find_projections(graph_module, model)
        projections = self._select(found, config, filter_fn) if config.compresses_weights else []
        layouts, kv_sources = None, []
        if config.kv_ratio is not None:
            layouts = kv.find_attention_layers(model)
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
        svds = {}
        for name in tqdm(shapes, desc="decompose", disable=not progress):
            scaling = build_scaling(config.method, statistics.get(name), config.alpha, config.asvd_statistic)
            svds[name] = ScaledSVD.of(projection_weight(model.get_submodule(name)), scaling)
        kv_svds, group_size = {}, None
        if layouts is not None:
            group_size = kv.resolve_group_size(layouts, config.kv_group_size)
            scalings = {
                name: build_scaling(config.method, statistics.get(name), config.alpha, config.asvd_statistic)
                for name in kv_sources
            }
            grams = None
            if config.kv_output_metric:  # the key metric needs the input Gram; without it only V is weighted
                grams = {
                    name: statistics[name].gram / statistics[name].count
                    for name in kv_sources
                    if name in statistics and statistics[name].gram is not None
                }
            kv_svds = kv.group_svds(model, layouts, scalings, group_size, grams)
        seconds["decompose"] = time.perf_counter() - tick
        source = config.calibration if calibration is None else calibration
        return Analysis(
            windows, shapes, statistics, svds, seconds,
            source if isinstance(source, (str, type(None))) else "tensor",
            kv_layouts=layouts, kv_svds=kv_svds, kv_group_size=group_size,
        )

    def apply(self, analysis: "Analysis", config: ASVDConfig, save_dir=None, progress: bool = True) -> CompressionReport:
        """Allocate ranks for ``config``'s budget, swap in the factored modules, report, and save."""
        model = self.model
        measured_before = analysis.total_sensitivity_seconds()
        tick = time.perf_counter()
        plan = self._plan(analysis, config, progress) if config.compresses_weights else RankPlan({}, {})
        # Both plans read the dense model (sensitivities), so both are made before anything is swapped.
        kv_plan = self._kv_plan(analysis, config, progress) if analysis.kv_layouts else None
        seconds = dict(analysis.seconds)
        charged = ({config.allocation} if config.compresses_weights else set()) | (
            {"fisher"} if kv_plan is not None and config.kv_allocation == "fisher" else set()
        )
        # Sensitivities measured during this call are inside the elapsed time; charge each one once.
        planning = time.perf_counter() - tick - (analysis.total_sensitivity_seconds() - measured_before)
        seconds["allocate"] = planning + sum(analysis.sensitivity_seconds(key) for key in charged)

        model_params_before = _model_params(model)
        replacements = {name: self._lowrank(name, analysis.svds[name], rank) for name, rank in plan.factored.items()}
        for name, module in replacements.items():
            replace_module(model, name, module)
        if output_projection_name(model) in replacements:
            _untie_output_embeddings(model)
        if kv_plan is not None:
            kv.apply_kv_plan(model, analysis.kv_layouts, kv_plan, analysis.kv_svds)
        seconds["compress"] = sum(seconds.values())

        windows = analysis.windows
        model.config.quantization_config = ASVDQuantizationConfig(
            ranks=plan.factored,
            method=config.method,
            allocation=config.allocation,
            param_ratio=config.param_ratio,
            alpha=config.alpha,
            asvd_statistic=config.asvd_statistic,
            calibration=analysis.calibration_source,
            calib_samples=int(windows.shape[0]),
            seqlen=int(windows.shape[1]),
            seed=config.seed,
            kv=kv_plan.to_dict() if kv_plan is not None else None,
            kv_ratio=config.kv_ratio,
            kv_allocation=config.kv_allocation if kv_plan is not None else None,
        )
        report = CompressionReport(
            method=config.method,
            allocation=config.allocation,
            ranks=dict(plan.ranks),
            max_ranks={name: shape.max_rank for name, shape in analysis.shapes.items()},
            selected_ratio=plan.ratio,
            model_ratio=_model_params(model) / model_params_before,
            selected_params_before=plan.original_params,
            selected_params_after=plan.total_kept_params,
            model_params_before=model_params_before,
            model_params_after=_model_params(model),
            calibration_tokens=int(windows.numel()),
            seconds=seconds,
            peak_rss_mib=_peak_rss_mib(),
            kv=None if kv_plan is None else dict(
                kv_plan.to_dict(),
                kv_ratio=kv_plan.ratio,
                key_ratio=kv_plan.role_ratio("key"),
                value_ratio=kv_plan.role_ratio("value"),
                allocation=config.kv_allocation,
                dense_width=kv_plan.dense_width,
                latent_width=kv_plan.total_latent_width,
            ),
        )
        if save_dir is not None:
            self.save(save_dir, config, report)
        return report

    def save(self, save_dir, config: ASVDConfig, report: CompressionReport) -> None:
        with atomic_directory(save_dir) as staging:
            self.model.save_pretrained(staging)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(staging)
            config.save_pretrained(staging)
            write_json(Path(staging) / REPORT_FILE, report.to_dict())
            if report.ranks:
                plot_ranks(report.ranks, report.max_ranks, Path(staging) / RANKS_PLOT,
                           f"{report.method} / {report.allocation}: ratio {report.selected_ratio:.3f}")

    # -- steps -----------------------------------------------------------------------------------

    def _calibration(self, config: ASVDConfig, calibration) -> torch.Tensor:
        if isinstance(calibration, torch.Tensor):
            if calibration.dim() != 2 or calibration.shape[1] < 2:
                raise InvalidInputError("calibration tensor must be (samples, seqlen) token ids")
            return calibration.long().cpu()
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and config.seqlen > limit:
            raise InvalidInputError(f"seqlen {config.seqlen} is longer than the model's {limit} positions")
        source = calibration if calibration is not None else config.calibration
        if source not in (None, "selfgen") or config.statistics:
            if self.tokenizer is None:
                raise InvalidInputError("calibration from text needs a tokenizer: use from_pretrained or pass token ids")
        if self.tokenizer is None:
            # Plain SVD needs no statistics; a tracing example of random ids is enough.
            generator = torch.Generator().manual_seed(config.seed)
            return torch.randint(0, self.model.config.vocab_size, (1, config.seqlen), generator=generator)
        return calibration_windows(source, self.model, self.tokenizer, config.calib_samples, config.seqlen, config.seed)

    def _select(self, projections, config: ASVDConfig, filter_fn):
        if not projections:
            raise NoProjectionsError(f"{type(self.model).__name__} has no linear projections to compress")
        head = output_projection_name(self.model)
        selected = [
            p
            for p in projections
            if (config.include_lm_head or p.name != head)
            and (filter_fn is None or filter_fn(p.name, self.model.get_submodule(p.name)))
        ]
        if not selected:
            raise NoProjectionsError("No projection is left to compress after the filters")
        return selected

    def _lowrank(self, name: str, svd: ScaledSVD, rank: int) -> LowRankLinear:
        dense = self.model.get_submodule(name)
        weight = projection_weight(dense)
        down, up = svd.factors(rank)
        return LowRankLinear.from_factors(down, up, getattr(dense, "bias", None), dtype=weight.dtype, device=weight.device)

    def _plan(self, analysis: "Analysis", config: ASVDConfig, progress) -> RankPlan:
        """Ranks from the configured allocation; an explicit ``ranks`` map overrides what it names."""
        shapes = analysis.shapes
        if config.ranks and config.param_ratio is None:
            return explicit_plan(shapes, config.ranks)
        if config.allocation == "uniform":
            plan = uniform_ratio_plan(shapes, config.param_ratio, config.rank_multiple)
        elif config.allocation == "fisher":
            fisher = self._fisher(analysis, config, progress)
            grams = {
                name: stats.gram / stats.count
                for name, stats in analysis.statistics.items()
                if name in shapes and stats.gram is not None
            }
            plan = fisher_plan(shapes, analysis.svds, fisher, grams, config.param_ratio, config.rank_multiple)
        else:
            sensitivities = analysis.cached("strs", lambda: self._strs_sensitivities(analysis, config, progress))
            plan = strs_plan(
                shapes,
                sensitivities,
                ratio=None if config.ppl_target is not None else config.param_ratio,
                ppl_target=config.ppl_target,
                multiple=config.rank_multiple,
            )
        return explicit_plan(shapes, config.ranks, plan) if config.ranks else plan

    def _fisher(self, analysis: "Analysis", config: ASVDConfig, progress) -> dict:
        """Diagonal Fisher of every weight-plan projection and every K/V source, in one set of passes."""
        names = list(analysis.shapes)
        if analysis.kv_layouts:
            names += [l.source(r) for l in analysis.kv_layouts for r in kv.plan.ROLES if l.source(r) not in names]
        names = list(dict.fromkeys(names))
        sample = analysis.windows[: config.sensitivity_samples]
        return analysis.cached("fisher", lambda: output_fisher(self.model, names, sample, progress=progress))

    def _kv_plan(self, analysis: "Analysis", config: ASVDConfig, progress) -> "kv.KVPlan":
        layouts, group_size = analysis.kv_layouts, analysis.kv_group_size
        if config.kv_allocation == "uniform":
            return kv.uniform_kv_plan(layouts, config.kv_ratio, group_size, config.rank_multiple)
        fisher = self._fisher(analysis, config, progress)
        costs = {}
        for (name, role, g), svd in analysis.kv_svds.items():
            layout = next(l for l in layouts if l.name == name)
            source = layout.source(role)
            width = group_size * layout.head_dim
            rows = fisher[source][layout.rows(role)][g * width : (g + 1) * width]
            stats = analysis.statistics.get(source)
            gram = stats.gram / stats.count if stats is not None and stats.gram is not None else None
            costs[(name, role, g)] = loss_cost_curve(svd, rows, gram).tolist()
        return kv.greedy_kv_plan(layouts, costs, config.kv_ratio, group_size, config.rank_multiple,
                                 equal_widths=config.kv_equal_widths)

    def _strs_sensitivities(self, analysis: "Analysis", config: ASVDConfig, progress) -> dict:
        sample = analysis.windows[: config.sensitivity_samples]
        key = sensitivity_key(
            model_fingerprint(self.model), config.method, config.alpha, config.asvd_statistic,
            config.strs_candidates, sample, analysis.windows,
        )
        return load_or_measure(
            cache_dir() / "sensitivities" / f"{key}.json",
            lambda: measure_sensitivities(
                self.model, analysis.shapes, lambda name, rank: self._lowrank(name, analysis.svds[name], rank),
                sample, config.strs_candidates, config.rank_multiple, progress,
            ),
        )
