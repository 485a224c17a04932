"""Decode speed of exact K absorption (GPT-2/OPT: no RoPE) against rebuilding K, and against dense.

A GPT-2-small-shaped model (12 layers, hidden 768, 12 heads of 64, vocab 50257) with **random
weights** (speed only: no quality is measured or claimed here) gets a latent KV cache at
``--kv-ratio`` for each KV head-group size G (G=12: one latent per layer shared by all heads, wider
than a head; G=1: one latent per head, narrower than a head). Per variant, greedy decode tokens/s
after a context of C tokens (batch 1), in PyTorch (``absorb_policy`` never vs auto; ``auto``
absorbs every decode step) and in ONNX Runtime (exports with ``absorb_key`` never vs always).
Variants are interleaved within each repeat and keep their best, so machine noise hits all alike.

    python benchmarks/absorption.py     # writes benchmarks/results/absorption.{md,json}
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's asvd_passes, whatever is installed
sys.path.insert(0, str(ROOT / "benchmarks"))


def gpt2_small(layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    return GPT2LMHeadModel(config).eval()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--kv-ratio", type=float, default=0.5)
    parser.add_argument("--group-sizes", default="12,1")
    parser.add_argument("--contexts", default="256,1000")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "absorption"))
    args = parser.parse_args()

    from asvd_passes import ASVDCompressor, ASVDConfig
    from asvd_passes.inspect_model import measure_kv_bytes_per_token
    from asvd_passes.kv import LatentKVAttention
    from exporters import ORTCausalLM, export_onnx
    from kv import decode_tokens_per_second
    from onnx_runtime import run_decode

    workdir = Path(tempfile.mkdtemp(prefix="asvd-absorb-bench-"))
    models = {"dense": gpt2_small(args.layers)}
    for group_size in [int(g) for g in args.group_sizes.split(",")]:
        model = gpt2_small(args.layers)
        config = ASVDConfig(method="svd", param_ratio=None, kv_ratio=args.kv_ratio, kv_group_size=group_size,
                            kv_allocation="uniform", seqlen=64, calib_samples=1)
        ASVDCompressor(model).compress(config, calibration=torch.randint(0, 50257, (1, 64)), progress=False)
        models[f"latent G={group_size}"] = model
    print(f"models built in {workdir}", flush=True)

    # PyTorch: each latent model with K rebuilt (never) and absorbed (auto: every decode step absorbs).
    torch_variants = {"dense": ("dense", None)}
    for label in models:
        if label != "dense":
            torch_variants[f"{label}, rebuild K"] = (label, "never")
            torch_variants[f"{label}, absorb K"] = (label, "auto")
    onnx_variants = {}
    if not args.skip_onnx:
        for label, model in models.items():
            for absorb in (["never"] if label == "dense" else ["never", "always"]):
                name = label if label == "dense" else f"{label}, {'absorb' if absorb == 'always' else 'rebuild'} K"
                folder = workdir / name.replace(" ", "_").replace(",", "").replace("=", "")
                tick = time.perf_counter()
                export_onnx(model, folder, absorb_key=absorb)
                print(f"{name}: export {time.perf_counter() - tick:.0f} s", flush=True)
                onnx_variants[name] = ORTCausalLM(folder)

    rows = []
    previous = LatentKVAttention.absorb_policy
    try:
        for context in [int(c) for c in args.contexts.split(",")]:
            measured = {}
            for _ in range(args.repeats):
                for label, (model_label, policy) in torch_variants.items():
                    LatentKVAttention.absorb_policy = policy or previous
                    tps = decode_tokens_per_second(models[model_label], context, args.decode_steps, 1)
                    measured[("torch", label)] = max(measured.get(("torch", label), 0.0), tps)
                for label, runtime in onnx_variants.items():
                    _, tps, _ = run_decode(runtime, 1, context, args.decode_steps)
                    measured[("onnxruntime", label)] = max(measured.get(("onnxruntime", label), 0.0), tps)
            for (runtime, label), tps in measured.items():
                model = models[torch_variants[label][0]] if runtime == "torch" else models[label.split(",")[0]]
                rows.append(dict(runtime=runtime, variant=label, context=context, tokens_per_s=tps,
                                 vs_dense=tps / measured[(runtime, "dense")],
                                 cache_bytes_per_token=measure_kv_bytes_per_token(model)))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        LatentKVAttention.absorb_policy = previous

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=2))
    lines = [
        f"Random-weight GPT-2-small shapes ({args.layers} layers, hidden 768, 12 heads of 64), fp32, batch 1, CPU "
        f"({torch.get_num_threads()} torch threads). KV ratio {args.kv_ratio}, uniform ranks. Greedy decode of "
        f"{args.decode_steps} tokens after a context of C tokens; best of {args.repeats}, variants interleaved.",
        "",
        "| runtime | variant | context C | decode tokens/s | vs dense | cache bytes/token |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['runtime']} | {row['variant']} | {row['context']} | {row['tokens_per_s']:.1f} | "
                     f"{row['vs_dense']:.2f}× | {row['cache_bytes_per_token']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
