"""Quality benchmark: methods × allocations × parameter ratios on the embedded SmolLM2-135M.

Per method, everything that does not depend on the budget (calibration statistics, the scaled SVD
of every projection, Fisher sensitivities, STRS probes) is computed once with
``ASVDCompressor.analyze`` and reused for every ratio, exactly as a single ``compress`` would
compute it. The time column is what one ``asvd compress`` of that (method, allocation, ratio)
costs: the analysis stages plus its allocation (sensitivities included), not counting model load.
(For svd/asvd the statistics pass also gathers XᵀX for the fisher runs, so their uniform/strs
times include that gram cost too: an upper bound.) STRS probes are cached on disk (``~/.cache/asvd_passes/sensitivities``).

    python benchmarks/quality.py            # writes benchmarks/results/quality.{md,json,png}
    python benchmarks/quality.py --render LOG   # the same files from the rows a run printed (a cut-off run too)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's asvd_passes, whatever is installed
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"

from asvd_passes.report import peak_rss_mib  # noqa: E402  (after this checkout is put first)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="svd,asvd,whiten")
    parser.add_argument("--allocations", default="uniform,fisher")
    parser.add_argument("--strs-methods", default="asvd,whiten", help="methods that also run STRS ('' for none)")
    parser.add_argument("--ratios", default="0.95,0.9,0.85,0.8")
    parser.add_argument("--strs-samples", type=int, default=4, help="calibration windows for STRS probes")
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality"))
    parser.add_argument("--render", default=None, help="write the outputs from the JSON rows printed in this log")
    args = parser.parse_args()
    if args.render:
        dense, rows = rows_from_log(Path(args.render))
        write_outputs(args, dense, rows)
        return 0

    from asvd_passes import ASVDCompressor, ASVDConfig, perplexity
    from asvd_passes.modules import replace_module

    ratios = [float(r) for r in args.ratios.split(",")]
    test = str(DATA / "wiki.test.raw")
    calib = dict(calibration=str(DATA / "wiki.valid.tokens"), calib_samples=16, seqlen=args.seqlen, seed=0)
    compressor = ASVDCompressor.from_pretrained(None)
    model, tokenizer = compressor.model, compressor.tokenizer
    dense = perplexity(model, tokenizer, test, args.seqlen, args.windows, progress=False)
    print(f"dense ppl {dense['ppl']:.3f}", flush=True)
    print(json.dumps(dict(dense=dense)), flush=True)
    rows = [dict(method="dense", allocation="-", ratio=1.0, achieved=1.0, model_ratio=1.0, ppl=dense["ppl"], seconds=0.0)]
    strs_methods = [m for m in args.strs_methods.split(",") if m]

    for method in args.methods.split(","):
        allocations = args.allocations.split(",") + (["strs"] if method in strs_methods else [])
        # The analysis gathers the statistics that any of these allocations needs (fisher adds XᵀX).
        base = ASVDConfig(method=method, allocation="fisher" if "fisher" in allocations else allocations[0],
                          param_ratio=0.9, lowrank_form="pair", **calib)
        tick = time.perf_counter()
        analysis = compressor.analyze(base, progress=False)
        print(f"{method}: analysis {time.perf_counter() - tick:.1f} s {analysis.seconds}", flush=True)
        dense_modules = {name: model.get_submodule(name) for name in analysis.shapes}
        for allocation in allocations:
            for ratio in ratios:
                extra = dict(sensitivity_samples=args.strs_samples) if allocation == "strs" else {}
                # The papers' two factors (r·(in+out) per rank), as the committed table was made.
                config = ASVDConfig(method=method, allocation=allocation, param_ratio=ratio, lowrank_form="pair",
                                    **calib, **extra)
                report = compressor.apply(analysis, config, progress=False)
                result = perplexity(model, tokenizer, test, args.seqlen, args.windows, progress=False)
                stages = dict(report.seconds)
                rows.append(dict(method=method, allocation=allocation, ratio=ratio, achieved=report.selected_ratio,
                                 model_ratio=report.model_ratio, ppl=result["ppl"], seconds=stages["compress"],
                                 stages=stages, peak_rss_mib=peak_rss_mib()))
                print(json.dumps(rows[-1]), flush=True)
                for name, module in dense_modules.items():  # back to dense for the next run
                    replace_module(model, name, module)
                del model.config.quantization_config

    write_outputs(args, dense, rows)
    return 0


def rows_from_log(log: Path) -> tuple[dict, list[dict]]:
    """The dense result and the rows from a run's stdout (``dense ppl X`` and one JSON object per row)."""
    dense, rows = None, []
    for line in log.read_text().splitlines():
        if line.startswith('{"dense"'):
            dense = json.loads(line)["dense"]
        elif line.startswith("dense ppl ") and dense is None:  # logs from before the dense JSON line
            dense = dict(ppl=float(line.split()[2]), seqlen=None, windows=None, tokens=None)
        elif line.startswith('{"method"'):
            rows.append(json.loads(line))
    if dense is None or not rows:
        raise SystemExit(f"{log}: no dense result or no rows")
    rows.insert(0, dict(method="dense", allocation="-", ratio=1.0, achieved=1.0, model_ratio=1.0, ppl=dense["ppl"], seconds=0.0))
    return dense, rows


def write_outputs(args, dense: dict, rows: list[dict]) -> None:
    windows = dense["windows"] or args.windows
    tokens = dense["tokens"] or windows * (args.seqlen - 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(dense=dense, rows=rows), indent=2))
    from asvd_passes.models import EMBEDDED_DESCRIPTION

    lines = [
        f"{EMBEDDED_DESCRIPTION}; CPU (2 cores). Perplexity: WikiText-2 test, seqlen {args.seqlen}, "
        f"{windows} windows ({tokens} tokens). Calibration: 16×{args.seqlen} validation windows, seed 0; "
        f"sensitivities on the first windows of them (fisher: 4, strs: {args.strs_samples}).",
        "",
        "| method | allocation | requested ratio | achieved ratio | whole-model ratio | perplexity | compression s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['method']} | {row['allocation']} | {row['ratio']:.2f} | {row['achieved']:.4f} | "
                     f"{row['model_ratio']:.4f} | {row['ppl']:.2f} | {row['seconds']:.0f} | {row.get('peak_rss_mib', 0):.0f} |")
    lines.append("\nPeak RSS is the sweep process's maximum so far (it holds the dense model, the analysis and"
                 " one compressed copy), not the cost of one `asvd compress` alone.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, dense["ppl"], out.with_suffix(".png"))


def plot(rows, dense_ppl, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    lines = {}
    for row in rows[1:]:
        lines.setdefault((row["method"], row["allocation"]), []).append((row["achieved"], row["ppl"]))
    for (method, allocation), points in sorted(lines.items()):
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{method} / {allocation}")
    axis.axhline(dense_ppl, color="black", linestyle="--", label=f"dense ({dense_ppl:.2f})")
    axis.set_yscale("log")
    axis.set_xlabel("achieved parameter ratio (selected projections)")
    axis.set_ylabel("WikiText-2 perplexity (log)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
