"""Quantized latent KV cache on the embedded SmolLM2-135M: perplexity against cache bytes per token.

Only K/V are compressed (dense weights). For each KV ratio the latent cache is measured in float,
then stored as 8- and 4-bit codes with static scales calibrated on the calibration windows (per
latent channel, per tensor, with and without an orthogonal rotation folded into the factors).
Perplexity: WikiText-2 test, the protocol of ``../shared/data/README.md``; bytes per token measured
from a real cache object (``asvd inspect``'s probe). Whole-model pipeline: one analysis serves every
ratio (the CLI defaults to the sequential pipeline, which calibrates block by block).

    python benchmarks/kv_quant.py      # writes benchmarks/results/kv_quant.{md,json} (after every row)
    python benchmarks/kv_quant.py --from-log RUN.log   # the tables from the rows a run printed
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's asvd_passes, whatever is installed
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"

# Stored forms measured per KV ratio, as (bits, granularity, rotate); bits None: the float latent.
# Ordered by importance (a run on a busy machine takes ~4 min per perplexity); rotated forms last at each
# ratio, since a rotation stays folded into the factors. At KV ratio 1.0 the float latent equals the dense
# model (full rank), so it is not measured again.
FORMS = {
    1.0: [(8, "channel", False), (4, "channel", False), (4, "tensor", False), (4, "channel", True)],
    0.5: [(4, "channel", False), (8, "channel", False), (None, "-", False), (4, "channel", True)],
    0.75: [(8, "channel", False), (4, "channel", False), (None, "-", False)],
}
DEFAULT_FORMS = [(None, "-", False), (8, "channel", False), (4, "channel", False)]


def write_results(rows: list[dict], out: Path, seqlen: int, windows: int, tokens: int | None) -> None:
    """``out``.json (the rows) and ``out``.md (the table)."""
    from asvd_passes.models import EMBEDDED_DESCRIPTION

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(windows=windows, tokens=tokens, rows=rows), indent=2))
    lines = [
        f"{EMBEDDED_DESCRIPTION}; CPU, fp32 weights (only K/V factored, whiten, fisher KV allocation, one latent "
        f"per layer for all KV heads). Perplexity: WikiText-2 test, seqlen {seqlen}, {windows} windows"
        + (f" ({tokens} tokens)" if tokens else "") + f". Calibration (factors and cache scales) 16×{seqlen} "
        "validation windows, seed 0. Cache bytes per token measured from the cache after a 16-token forward.",
        "",
        "| KV ratio | K ratio | stored bits | scales | rotation | perplexity | cache bytes/token |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        key_ratio = f"{row['key_ratio']:.3f}" if "key_ratio" in row else "-"
        lines.append(f"| {row['ratio']:.2f} | {key_ratio} | {row['bits']} | {row['granularity']} | "
                     f"{'yes' if row['rotate'] else 'no'} | {row['ppl']:.2f} | {row['bytes_per_token']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", default="1.0,0.5,0.75")
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kv_quant"))
    parser.add_argument("--from-log", default=None,
                        help="only write the tables from the JSON rows a run printed (e.g. a run cut short)")
    args = parser.parse_args()
    if args.from_log:
        rows = [json.loads(line) for line in Path(args.from_log).read_text().splitlines() if line.startswith("{")]
        write_results(rows, Path(args.out), args.seqlen, args.windows, None)
        return 0

    from asvd_passes import ASVDCompressor, ASVDConfig, perplexity
    from asvd_passes.inspect_model import measure_kv_bytes_per_token
    from asvd_passes.kv import LatentKVAttention
    from asvd_passes.modules import replace_module
    from asvd_passes.pipelines.whole import WholeModelPipeline

    test = str(DATA / "wiki.test.raw")
    calib = dict(calibration=str(DATA / "wiki.valid.tokens"), calib_samples=16, seqlen=args.seqlen, seed=0)
    compressor = ASVDCompressor.from_pretrained(None)
    model, tokenizer = compressor.model, compressor.tokenizer
    dense_bytes = measure_kv_bytes_per_token(model)
    dense = perplexity(model, tokenizer, test, args.seqlen, args.windows, progress=False)
    rows = [dict(ratio=1.0, bits="dense", granularity="-", rotate=False, ppl=dense["ppl"], bytes_per_token=dense_bytes)]
    print(json.dumps(rows[-1]), flush=True)

    analysis = compressor.analyze(ASVDConfig(param_ratio=None, kv_ratio=0.5, **calib), progress=False)
    dense_attention = {l.name: model.get_submodule(l.name) for l in analysis.kv_layouts}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        config = ASVDConfig(param_ratio=None, kv_ratio=ratio, **calib)
        report = compressor.apply(analysis, config, progress=False)
        for bits, granularity, rotate in FORMS.get(ratio, DEFAULT_FORMS):
            for attention in (m for m in model.modules() if isinstance(m, LatentKVAttention)):
                attention.key_quantizer = attention.value_quantizer = None
            if bits is not None:
                quantized = ASVDConfig(param_ratio=None, kv_ratio=ratio, kv_bits=bits, kv_quant_granularity=granularity,
                                       kv_quant_rotate=rotate, **calib)
                WholeModelPipeline(model, False).calibrate_kv_quantizers(analysis.windows, quantized, bits)
            result = perplexity(model, tokenizer, test, args.seqlen, args.windows, progress=False)
            rows.append(dict(ratio=ratio, achieved=report.kv["kv_ratio"], key_ratio=report.kv["key_ratio"],
                             bits=bits or 32, granularity=granularity, rotate=rotate, ppl=result["ppl"],
                             bytes_per_token=measure_kv_bytes_per_token(model)))
            print(json.dumps(rows[-1]), flush=True)
            write_results(rows, Path(args.out), args.seqlen, dense["windows"], dense["tokens"])  # a cut run keeps its rows
        for attention in (m for m in model.modules() if isinstance(m, LatentKVAttention)):
            attention.key_quantizer = attention.value_quantizer = None
        for name, module in dense_attention.items():
            replace_module(model, name, module)
        del model.config.quantization_config

    write_results(rows, Path(args.out), args.seqlen, dense["windows"], dense["tokens"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
