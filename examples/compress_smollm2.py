"""Compress the embedded SmolLM2-135M with ASVD from Python, evaluate it, save it, load it back.

    python examples/compress_smollm2.py --ratio 0.9 --out out/example
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import asvd_passes  # noqa: F401  (registers the "asvd" quantizer with transformers)
from asvd_passes import ASVDCompressor, ASVDConfig, perplexity

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--out", default="out/example")
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder of an earlier run")
    args = parser.parse_args()

    calibration = DATA / "wiki.valid.tokens"
    config = ASVDConfig(
        method="whiten",
        allocation="fisher",
        param_ratio=args.ratio,
        calibration=str(calibration) if calibration.is_file() else "selfgen",
        calib_samples=16,
        seqlen=512,
        seed=0,
    )
    compressor = ASVDCompressor.from_pretrained(None)  # None = the embedded SmolLM2-135M
    report = compressor.compress(config, save_dir=args.out, overwrite=args.overwrite)
    print(report.summary())

    reloaded = AutoModelForCausalLM.from_pretrained(args.out)  # plain transformers, no remote code
    ids = torch.arange(100, 132)[None]
    with torch.no_grad():
        same = torch.equal(reloaded(ids).logits, compressor.model(ids).logits)
    print(f"reloaded logits identical: {same}")

    test = DATA / "wiki.test.raw"
    if test.is_file():
        result = perplexity(reloaded, compressor.tokenizer, str(test), seqlen=512, windows=args.windows)
        print(f"perplexity {result['ppl']:.2f} (seqlen {result['seqlen']}, {result['windows']} windows)")


if __name__ == "__main__":
    main()
