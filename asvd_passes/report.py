"""What one compression reports and records: ``CompressionReport`` and the ``quantization_config``.

Both pipelines build them here, so a folder written by either carries the same fields.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from .config import ASVDConfig
from .hf_quantizer import ASVDQuantizationConfig
from .plots import plot_ranks
from .ranks import ProjectionShape, RankPlan
from .serialization import write_json

REPORT_FILE = "asvd_report.json"
RANKS_PLOT = "ranks.png"

try:
    import resource  # POSIX only
except ImportError:  # Windows
    resource = None


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
    pipeline: dict | None = None  # which pipeline ran, and why
    lowrank_form: str = "pair"  # how factored projections are stored (LowRankLinear)

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
            + (f"; pipeline {self.pipeline['name']}" if self.pipeline else "")
        )


def peak_rss_mib() -> float:
    """The process's peak resident set so far, in MiB (0 where the platform does not say)."""
    if resource is not None:
        # ru_maxrss is in kilobytes on Linux and the BSDs, in bytes on macOS.
        unit = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20
    try:
        import psutil
    except ImportError:
        return 0.0
    return getattr(psutil.Process().memory_info(), "peak_wset", 0) / 2**20  # Windows' peak working set


def model_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # .parameters() counts tied weights once


def build_report(config: ASVDConfig, plan: RankPlan, kv_plan, shapes: dict[str, ProjectionShape], seconds: dict,
                 calibration_tokens: int, params_before: int, params_after: int, pipeline: dict | None) -> CompressionReport:
    return CompressionReport(
        method=config.method,
        allocation=config.allocation,
        ranks=dict(plan.ranks),
        max_ranks={name: shape.max_rank for name, shape in shapes.items()},
        selected_ratio=plan.ratio,
        model_ratio=params_after / params_before,
        selected_params_before=plan.original_params,
        selected_params_after=plan.total_kept_params,
        model_params_before=params_before,
        model_params_after=params_after,
        calibration_tokens=calibration_tokens,
        seconds=dict(seconds),
        peak_rss_mib=peak_rss_mib(),
        pipeline=pipeline,
        lowrank_form=config.lowrank_form,
        kv=None if kv_plan is None else dict(
            kv_plan.to_dict(),
            kv_ratio=kv_plan.ratio,
            key_ratio=kv_plan.role_ratio("key"),
            value_ratio=kv_plan.role_ratio("value"),
            allocation=config.kv_allocation,
            dense_width=kv_plan.dense_width,
            latent_width=kv_plan.total_latent_width,
            bits=kv_plan.bits,
            budget=config.kv_budget,
        ),
    )


def quantization_config(config: ASVDConfig, plan: RankPlan, kv_plan, windows, calibration_source,
                        pipeline: str) -> ASVDQuantizationConfig:
    """What ``config.json`` records: the ranks (what loading needs) and how they were made."""
    extra = {}
    if pipeline == "sequential":
        extra = dict(sequential_calibration=config.sequential_calibration)
    return ASVDQuantizationConfig(
        ranks=plan.factored,
        method=config.method,
        allocation=config.allocation,
        param_ratio=config.param_ratio,
        alpha=config.alpha,
        asvd_statistic=config.asvd_statistic,
        calibration=calibration_source,
        calib_samples=int(windows.shape[0]),
        seqlen=int(windows.shape[1]),
        seed=config.seed,
        kv=kv_plan.to_dict() if kv_plan is not None else None,
        kv_ratio=config.kv_ratio,
        kv_allocation=config.kv_allocation if kv_plan is not None else None,
        kv_quant=kv_quant_record(config, kv_plan.bits) if kv_plan is not None else None,
        kv_budget=config.kv_budget,
        pipeline=pipeline,
        lowrank_form=config.lowrank_form,
        **extra,
    )


def kv_quant_record(config: ASVDConfig, bits: int | None) -> dict | None:
    """How the latent cache is stored (``None``: float); loading installs quantizers of these bits."""
    if bits is None:
        return None
    return {"bits": bits, "granularity": config.kv_quant_granularity, "rotate": config.kv_quant_rotate}


def write_side_files(folder, config: ASVDConfig, report: CompressionReport) -> None:
    """What every compressed folder holds beside the weights: the config, the report, the rank plot."""
    config.save_pretrained(folder)
    write_json(Path(folder) / REPORT_FILE, report.to_dict())
    if report.ranks:
        plot_ranks(report.ranks, report.max_ranks, Path(folder) / RANKS_PLOT,
                   f"{report.method} / {report.allocation}: ratio {report.selected_ratio:.3f}")
