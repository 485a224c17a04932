"""Latent KV cache benchmark on the embedded SmolLM2-135M: quality per KV ratio, and decode speed.

Quality: methods × KV head-group sizes × KV ratios, WikiText-2 perplexity (the protocol of
``../shared/data/README.md``) beside the dense model's, with the cache bytes per token measured
from a real cache object (``asvd inspect``'s probe). Only K/V are compressed (no ``param_ratio``).

Speed: greedy decode tokens/s after a prefill of C tokens (batch 1), dense cache against the latent
cache of each group size at one KV ratio, interleaved in one run so machine noise hits all alike.

    python benchmarks/kv.py        # writes benchmarks/results/kv.{md,json}
    python benchmarks/kv.py --skip-speed --out benchmarks/results/kv_quality    # the committed tables
    python benchmarks/kv.py --skip-quality --out benchmarks/results/kv_speed
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


def decode_tokens_per_second(model, context: int, steps: int, repeats: int) -> float:
    """Best of ``repeats`` timings of ``steps`` single-token decode steps after a ``context``-token prefill."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=generator)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            out = model(input_ids=ids, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tick = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            best = min(best, time.perf_counter() - tick)
    return steps / best


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="asvd,whiten")
    parser.add_argument("--group-sizes", default="1,3")
    parser.add_argument("--ratios", default="0.75,0.5,0.25")
    parser.add_argument("--allocation", default="fisher")
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--speed-ratio", type=float, default=0.5)
    parser.add_argument("--contexts", default="256,2048")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kv"))
    args = parser.parse_args()

    from asvd_passes import ASVDCompressor, ASVDConfig, perplexity
    from asvd_passes.inspect_model import measure_kv_bytes_per_token
    from asvd_passes.modules import replace_module

    test = str(DATA / "wiki.test.raw")
    calib = dict(calibration=str(DATA / "wiki.valid.tokens"), calib_samples=16, seqlen=args.seqlen, seed=0)
    compressor = ASVDCompressor.from_pretrained(None)
    model, tokenizer = compressor.model, compressor.tokenizer
    if args.threads:
        torch.set_num_threads(args.threads)
    dense_bytes = measure_kv_bytes_per_token(model)
    dense = (dict(ppl=float("nan"), windows=0, tokens=0) if args.skip_quality
             else perplexity(model, tokenizer, test, args.seqlen, args.windows, progress=False))
    print(f"dense ppl {dense['ppl']:.3f}, {dense_bytes} cache bytes/token", flush=True)
    rows = [dict(method="dense", group_size="-", ratio=1.0, achieved=1.0, key_ratio=1.0, value_ratio=1.0,
                 ppl=dense["ppl"], bytes_per_token=dense_bytes, seconds=0.0)]

    def restore(analysis):
        for layout in analysis.kv_layouts:
            replace_module(model, layout.name, dense_attention[layout.name])
        del model.config.quantization_config

    dense_attention = {}
    if not args.skip_quality:
        for method in args.methods.split(","):
            for group_size in [int(g) for g in args.group_sizes.split(",")]:
                base = ASVDConfig(method=method, param_ratio=None, kv_ratio=0.5, kv_group_size=group_size,
                                  kv_allocation=args.allocation, **calib)
                analysis = compressor.analyze(base, progress=False)
                dense_attention = {l.name: model.get_submodule(l.name) for l in analysis.kv_layouts}
                for ratio in [float(r) for r in args.ratios.split(",")]:
                    config = ASVDConfig(method=method, param_ratio=None, kv_ratio=ratio, kv_group_size=group_size,
                                        kv_allocation=args.allocation, **calib)
                    report = compressor.apply(analysis, config, progress=False)
                    result = perplexity(model, tokenizer, test, args.seqlen, args.windows, progress=False)
                    rows.append(dict(method=method, group_size=group_size, ratio=ratio, achieved=report.kv["kv_ratio"],
                                     key_ratio=report.kv["key_ratio"], value_ratio=report.kv["value_ratio"],
                                     ppl=result["ppl"], bytes_per_token=measure_kv_bytes_per_token(model),
                                     seconds=report.seconds["compress"]))
                    print(json.dumps(rows[-1]), flush=True)
                    restore(analysis)

    speed = []
    if not args.skip_speed:
        variants = {"dense": None}
        for group_size in [int(g) for g in args.group_sizes.split(",")]:
            variants[f"latent G={group_size}"] = group_size
        states = {}
        for label, group_size in variants.items():
            if group_size is None:
                continue
            config = ASVDConfig(method="whiten", param_ratio=None, kv_ratio=args.speed_ratio, kv_group_size=group_size,
                                kv_allocation=args.allocation, **calib)
            analysis = compressor.analyze(config, progress=False)
            dense_attention = {l.name: model.get_submodule(l.name) for l in analysis.kv_layouts}
            compressor.apply(analysis, config, progress=False)
            states[label] = {l.name: model.get_submodule(l.name) for l in analysis.kv_layouts}
            restore(analysis)
        for context in [int(c) for c in args.contexts.split(",")]:
            measured = {}
            for _ in range(args.repeats):  # interleaved: every variant once per repeat; each keeps its best
                for label in variants:
                    for name, module in (states.get(label) or dense_attention).items():
                        replace_module(model, name, module)
                    best = measured.get(label, (0.0, measure_kv_bytes_per_token(model)))
                    measured[label] = (max(best[0], decode_tokens_per_second(model, context, args.decode_steps, 1)), best[1])
            for label, (tps, nbytes) in measured.items():
                speed.append(dict(variant=label, context=context, tokens_per_s=tps,
                                  relative=tps / measured["dense"][0], bytes_per_token=nbytes,
                                  cache_mib=nbytes * context / 2**20))
                print(json.dumps(speed[-1]), flush=True)
        for name, module in dense_attention.items():
            replace_module(model, name, module)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(dense=dense, rows=rows, speed=speed), indent=2))
    from asvd_passes.models import EMBEDDED_DESCRIPTION

    lines = [] if args.skip_quality else [
        f"{EMBEDDED_DESCRIPTION}; CPU. Perplexity: WikiText-2 test, seqlen {args.seqlen}, {dense['windows']} windows "
        f"({dense['tokens']} tokens). Calibration 16×{args.seqlen} validation windows, seed 0. Only K/V compressed; "
        f"KV allocation `{args.allocation}`. Cache bytes per token measured from the cache after a 16-token forward.",
        "",
        "| method | KV group size | requested KV ratio | achieved | K ratio | V ratio | perplexity | cache bytes/token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows if not args.skip_quality else []:
        lines.append(f"| {row['method']} | {row['group_size']} | {row['ratio']:.2f} | {row['achieved']:.4f} | "
                     f"{row['key_ratio']:.3f} | {row['value_ratio']:.3f} | {row['ppl']:.2f} | {row['bytes_per_token']} |")
    if speed:
        lines += [
            "",
            f"Decode speed (SmolLM2-135M-Instruct, fp32, CPU, PyTorch eager, {torch.get_num_threads()} threads), batch 1, "
            f"greedy, {args.decode_steps} steps after a prefill of C tokens (best of {args.repeats}), whiten at KV ratio "
            f"{args.speed_ratio} ({args.allocation} allocation), variants interleaved in one run:",
            "",
            "| variant | context C | tokens/s | vs dense | cache bytes/token | cache MiB at C |",
            "|---|---|---|---|---|---|",
        ]
        for row in speed:
            lines.append(f"| {row['variant']} | {row['context']} | {row['tokens_per_s']:.1f} | {row['relative']:.2f}× | "
                         f"{row['bytes_per_token']} | {row['cache_mib']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
