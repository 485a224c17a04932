"""Quality of the sequential pipeline against today's whole-model default, on the embedded SmolLM2-135M.

Rows, per parameter ratio (whiten + fisher everywhere, the usual protocol of ``../shared/data/README.md``):
- ``whole``: the whole-model path (today's default where the model fits), one analysis for all ratios;
- ``sequential``: block by block, each block observed on the outputs of the compressed blocks
  before it (sequential calibration, the pipeline's default);
- ``sequential + output whitening``: the default with ``output_whitening="gradient"`` (outputs whitened
  by the loss-gradient covariance, K-FAC's output factor) over all 16 calibration windows;
- ``… (interpolative)``: the same factors stored in the interpolative form (``lowrank_form``, the
  default since it exists: r rows of each rank-r matrix plus the other rows as combinations of
  them, r·(in+out−r) parameters instead of r·(in+out)), so the same budget keeps a higher rank.
  Every other row pins the papers' two-factor ``pair`` form.
(Sequential with sequential calibration off gives the whole path's factors; the tests prove that.)
The committed table also has ``sequential + refit`` (closed-form refit of ``up``: 49.42 at 0.8) and
``sequential + float32 SVD`` (46.06, as float64) rows, committed in e22a356 and made by options since removed.

Pass 1 of the sequential pipeline (every projection's loss-cost curve, on the dense model) depends
on neither the ratio nor the variant, so it runs once and is reused by every sequential row; each
row then runs its own pass 2 on a fresh copy of the dense model. The time column is pass 2 plus
what a single run would spend on pass 1 (measured once, added to every sequential row).

    python benchmarks/sequential_quality.py    # writes benchmarks/results/sequential_quality.{md,json}
    python benchmarks/sequential_quality.py --render LOG   # the same files from the rows a run printed (a cut-off run too)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's asvd_passes, whatever is installed
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"

PAIR = dict(lowrank_form="pair")  # the papers' two factors, r·(in+out) parameters per rank
VARIANTS = {
    "whole": dict(PAIR),
    "sequential": dict(pipeline="sequential", sequential_calibration=True, **PAIR),
    "sequential + output whitening": dict(pipeline="sequential", sequential_calibration=True,
                                          output_whitening="gradient", sensitivity_samples=16, **PAIR),
    # The same matrices stored as r rows plus combinations of them: r·(in+out−r) per rank (the default).
    "whole (interpolative)": dict(lowrank_form="interpolative"),
    "sequential (interpolative)": dict(pipeline="sequential", sequential_calibration=True,
                                      lowrank_form="interpolative"),
    "sequential + output whitening (interpolative)": dict(
        pipeline="sequential", sequential_calibration=True, output_whitening="gradient",
        sensitivity_samples=16, lowrank_form="interpolative"),
}
WHOLE = ("whole", "whole (interpolative)")  # one shared analysis, applied at every ratio


def _pass_one_key(config) -> tuple:
    """What pass 1's result depends on among the variants (the rest is common to every run)."""
    return (config.output_whitening, config.sensitivity_samples)


class ReusedPassOne:
    """Patches ``SequentialPipeline._cost_curves`` to compute pass 1 once and return it to later runs.

    Valid here because every run starts from the same dense model, calibration windows and method;
    a variant with output whitening gets its own pass 1.
    """

    def __init__(self):
        from asvd_passes.pipelines.sequential import SequentialPipeline

        self.owner, self.original = SequentialPipeline, SequentialPipeline._cost_curves
        self.result, self.seconds, self.key = None, 0.0, None
        self.kept = Path(tempfile.mkdtemp(prefix="asvd-pass-one-")) / "covariances"

    def __enter__(self):
        def cost_curves(pipeline, hidden, calls, shapes):
            key = _pass_one_key(pipeline.config)
            store = pipeline._covariances  # pass 1's output-gradient covariances, read by pass 2
            if self.result is None or self.key != key:
                tick = time.perf_counter()
                self.result = self.original(pipeline, hidden, calls, shapes)
                self.seconds, self.key = time.perf_counter() - tick, key
                shutil.rmtree(self.kept, ignore_errors=True)
                if store is not None:
                    shutil.copytree(store.folder, self.kept)
            elif store is not None:
                shutil.copytree(self.kept, store.folder, dirs_exist_ok=True)
            return self.result

        self.owner._cost_curves = cost_curves
        return self

    def __exit__(self, *exc):
        self.owner._cost_curves = self.original
        shutil.rmtree(self.kept.parent, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", default="0.95,0.9,0.85,0.8,0.7,0.6")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sequential_quality"))
    parser.add_argument("--render", default=None, help="write the outputs from the JSON rows printed in this log")
    args = parser.parse_args()
    if args.render:
        from asvd_passes.models import EMBEDDED_DESCRIPTION

        lines = [json.loads(line) for line in Path(args.render).read_text().splitlines() if line.startswith("{")]
        dense = next(line["dense"] for line in lines if "dense" in line)
        write_outputs(args, dense, [line for line in lines if "variant" in line], EMBEDDED_DESCRIPTION)
        return 0

    from asvd_passes import ASVDCompressor, ASVDConfig, perplexity
    from asvd_passes.models import EMBEDDED_DESCRIPTION
    from asvd_passes.modules import replace_module

    ratios = [float(r) for r in args.ratios.split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    test = str(DATA / "wiki.test.raw")
    calib = dict(method="whiten", allocation="fisher", calibration=str(DATA / "wiki.valid.tokens"),
                 calib_samples=16, seqlen=args.seqlen, seed=0)
    compressor = ASVDCompressor.from_pretrained(None)
    model, tokenizer = compressor.model, compressor.tokenizer
    dense = perplexity(model, tokenizer, test, args.seqlen, args.windows, progress=False)
    print(json.dumps(dict(dense=dense)), flush=True)
    rows = []

    whole_variants = [v for v in variants if v in WHOLE]
    if whole_variants:
        tick = time.perf_counter()
        analysis = compressor.analyze(ASVDConfig(param_ratio=0.9, pipeline="whole", **calib), progress=False)
        analysis_seconds = time.perf_counter() - tick
        dense_modules = {name: model.get_submodule(name) for name in analysis.shapes}
        for variant in whole_variants:
            for ratio in ratios:
                config = ASVDConfig(param_ratio=ratio, pipeline="whole", **VARIANTS[variant], **calib)
                report = compressor.apply(analysis, config, progress=False)
                result = perplexity(model, tokenizer, test, args.seqlen, args.windows, progress=False)
                rows.append(dict(variant=variant, ratio=ratio, achieved=report.selected_ratio, ppl=result["ppl"],
                                 seconds=report.seconds["compress"], pass_one_seconds=analysis_seconds))
                print(json.dumps(rows[-1]), flush=True)
                for name, module in dense_modules.items():
                    replace_module(model, name, module)
                del model.config.quantization_config
        del analysis, dense_modules

    with ReusedPassOne() as pass_one:
        for variant in [v for v in variants if v not in WHOLE]:
            for ratio in ratios:
                copy_ = copy.deepcopy(model)
                config = ASVDConfig(param_ratio=ratio, **VARIANTS[variant], **calib)
                reused = pass_one.result is not None and pass_one.key == _pass_one_key(config)
                tick = time.perf_counter()
                report = ASVDCompressor(copy_, tokenizer).compress(config, progress=False)
                seconds = time.perf_counter() - tick - (0.0 if reused else pass_one.seconds)  # pass 2 alone
                result = perplexity(copy_, tokenizer, test, args.seqlen, args.windows, progress=False)
                rows.append(dict(variant=variant, ratio=ratio, achieved=report.selected_ratio, ppl=result["ppl"],
                                 seconds=seconds, pass_one_seconds=pass_one.seconds))
                print(json.dumps(rows[-1]), flush=True)
                del copy_, report
                gc.collect()
    write_outputs(args, dense, rows, EMBEDDED_DESCRIPTION)
    return 0


def write_outputs(args, dense, rows, description) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(dense=dense, rows=rows), indent=2))
    ratios = sorted({row["ratio"] for row in rows}, reverse=True)
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    by = {(row["variant"], row["ratio"]): row for row in rows}
    lines = [
        f"{description}; CPU (2 cores). Perplexity: WikiText-2 test, seqlen {args.seqlen}, {dense['windows']} windows "
        f"({dense['tokens']} tokens); dense **{dense['ppl']:.2f}** in the same run. Calibration: 16×{args.seqlen} "
        f"validation windows, seed 0. whiten + fisher (4 windows for sensitivities; the output-whitening rows use "
        f"all 16 for the Fisher and the gradient covariance, damping 0.1). Ratio: parameters of the "
        f"selected projections as stored (achieved within one rank step): two factors, r·(in+out) per rank, "
        f"except the *interpolative* columns, r·(in+out−r) per rank (the same matrix at a given rank).",
        "",
        "| param ratio | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for ratio in ratios:
        cells = [f"{by[(v, ratio)]['ppl']:.2f}" if (v, ratio) in by else "–" for v in variants]
        lines.append(f"| {ratio:.2f} | " + " | ".join(cells) + " |")
    times = []
    for v in variants:
        seconds = [by[(v, r)]["seconds"] + by[(v, r)].get("pass_one_seconds", 0.0) for r in ratios if (v, r) in by]
        if seconds:
            times.append(f"{v} {min(seconds):.0f}–{max(seconds):.0f} s")
    lines.append("")
    lines.append("Compression time per run on this CPU: " + "; ".join(times) + " (whole: allocation and factoring "
                 "plus the one analysis it shares; sequential: pass 2 plus one pass 1; wall times on a shared "
                 "2-core CPU, comparable only between rows that ran alone).")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
