"""ONNX Runtime benchmark: dense-cache export against latent-cache exports of SmolLM2-135M.

Variants: the dense model (full-width cache), and the model compressed with ``param_ratio 0.9``
plus ``kv_ratio 0.5`` for each KV head-group size (V folded into the output path, the export
default; with ``--fold-never`` also the rebuild-V graph). For each: prefill latency of 512 tokens,
greedy decode tokens/s after a context of C tokens, and cache bytes (measured from the arrays ORT
returns). Variants run interleaved per context in one process, so machine noise hits all alike.

    python benchmarks/onnx_runtime.py     # writes benchmarks/results/onnx_runtime.{md,json}

On a GPU machine: ``--provider cuda --dtype fp16 --random-llama2-7b`` measures a random-weight model
with Llama-2-7B shapes (speed needs no trained weights).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's asvd_passes, whatever is installed
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def build_variants(args, workdir: Path) -> dict[str, Path]:
    import torch

    from asvd_passes import ASVDCompressor, ASVDConfig
    from exporters import export_onnx

    variants = {}
    if args.reuse and (workdir / "dense" / "model.onnx").is_file():  # exports of an earlier run of this script
        for folder in sorted(workdir.iterdir()):
            if (folder / "model.onnx").is_file():
                label = "dense" if folder.name == "dense" else folder.name.replace("latent_G", "latent G=").replace("_(rebuild", " (rebuild")
                variants[label] = folder
        return dict(sorted(variants.items(), key=lambda item: item[0] != "dense"))
    calibration = str(DATA / "wiki.valid.tokens") if DATA.is_dir() else "selfgen"

    def fresh():
        if args.random_llama2_7b:
            from transformers import AutoModelForCausalLM, LlamaConfig

            config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                 max_position_embeddings=8192)
            torch.manual_seed(0)
            return ASVDCompressor(AutoModelForCausalLM.from_config(config).eval())
        return ASVDCompressor.from_pretrained(None)

    tick = time.perf_counter()
    # A --workdir of an earlier run holds this script's exports: re-made here (without --reuse), so replaced.
    export_onnx(fresh().model, workdir / "dense", dtype=args.dtype, device=args.torch_device, overwrite=True)
    print(f"dense export {time.perf_counter() - tick:.0f} s", flush=True)
    variants["dense"] = workdir / "dense"
    for group_size in [int(g) for g in args.group_sizes.split(",")]:
        compressor = fresh()
        random = args.random_llama2_7b
        config = ASVDConfig(method="svd" if random else "whiten", param_ratio=args.param_ratio, kv_ratio=args.kv_ratio,
                            kv_group_size=group_size, allocation="uniform" if random else "fisher",
                            kv_allocation="uniform" if random else "fisher",
                            calibration=None if random else calibration, calib_samples=16, seqlen=512, seed=0,
                            pipeline="whole", lowrank_form="pair")  # the committed tables: whole-model path, pairs
        if random:  # plain SVD needs no calibration text; token ids drive the trace
            compressor.compress(config, calibration=torch.randint(0, 32000, (1, 64)), progress=False)
        else:
            compressor.compress(config, progress=False)
        for fold in (["always", "never"] if args.fold_never else ["always"]):
            label = f"latent G={group_size}" + ("" if fold == "always" else " (rebuild V)")
            tick = time.perf_counter()
            export_onnx(compressor.model, workdir / label.replace(" ", "_").replace("=", ""), dtype=args.dtype,
                        device=args.torch_device, fold_value=fold, overwrite=True)
            print(f"{label} export {time.perf_counter() - tick:.0f} s", flush=True)
            variants[label] = workdir / label.replace(" ", "_").replace("=", "")
    return variants


def run_decode(runtime, batch: int, context: int, steps: int):
    """(seconds for the prefill of ``context`` tokens, decode tokens/s over ``steps`` steps, cache bytes)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, runtime.metadata.vocab_size, size=(batch, context))
    mask = np.ones_like(ids)
    positions = np.tile(np.arange(context), (batch, 1))
    tick = time.perf_counter()
    logits, past = runtime.forward(ids, mask, positions, runtime.empty_cache(batch))
    prefill = time.perf_counter() - tick
    token = logits[:, -1].argmax(-1)[:, None]
    tick = time.perf_counter()
    for step in range(steps):
        mask = np.ones((batch, context + step + 1), dtype=np.int64)
        logits, past = runtime.forward(token, mask, np.full((batch, 1), context + step), past)
        token = logits[:, -1].argmax(-1)[:, None]
    decode = batch * steps / (time.perf_counter() - tick)
    nbytes = sum(int(np.prod(p.shape() if callable(getattr(p, "shape", None)) else p.shape)) for p in past)
    return prefill, decode, nbytes * (2 if runtime.metadata.dtype == "fp16" else 4) // (batch * (context + steps))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", default="128,1024,2048")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1")
    parser.add_argument("--group-sizes", default="3,1")
    parser.add_argument("--param-ratio", type=float, default=0.9)
    parser.add_argument("--kv-ratio", type=float, default=0.5)
    parser.add_argument("--fold-never", action="store_true", help="also export and time the rebuild-V graph")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--torch-device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--random-llama2-7b", action="store_true")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--reuse", action="store_true", help="time the exports already in --workdir")
    parser.add_argument("--export-only", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onnx_runtime"))
    args = parser.parse_args()

    from exporters import ORTCausalLM

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="asvd-onnx-bench-"))
    variants = build_variants(args, workdir)
    if args.export_only:
        return 0
    runtimes = {label: ORTCausalLM(folder, provider=args.provider, threads=args.threads) for label, folder in variants.items()}
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prefills = {}
        for label, runtime in runtimes.items():
            prefills[label] = min(run_decode(runtime, batch, args.prefill, 1)[0] for _ in range(args.repeats))
        for context in [int(c) for c in args.contexts.split(",")]:
            measured = {}
            for _ in range(args.repeats):  # interleave variants within each repeat; keep each one's best
                for label, runtime in runtimes.items():
                    _, tps, nbytes = run_decode(runtime, batch, context, args.decode_steps)
                    best = measured.get(label, (0.0, nbytes))
                    measured[label] = (max(best[0], tps), nbytes)
            for label, (tps, nbytes) in measured.items():
                rows.append(dict(variant=label, batch=batch, context=context, decode_tokens_per_s=tps,
                                 vs_dense=tps / measured["dense"][0], prefill_ms=1000 * prefills[label],
                                 cache_bytes_per_token=nbytes, cache_mib=nbytes * batch * context / 2**20))
                print(json.dumps(rows[-1]), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=2))
    model = "random-weight Llama-2-7B shapes" if args.random_llama2_7b else "SmolLM2-135M-Instruct"
    lines = [
        f"{model}, ONNX Runtime {args.provider.upper()} EP, {args.dtype}. Compressed variants: param ratio "
        f"{args.param_ratio} + KV ratio {args.kv_ratio} per KV head-group size G. Prefill: {args.prefill} tokens. "
        f"Decode: greedy, {args.decode_steps} steps after a context of C tokens, best of {args.repeats}, variants interleaved.",
        "",
        "| variant | batch | context C | decode tokens/s | vs dense | prefill ms | cache bytes/token | cache MiB at C |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['batch']} | {row['context']} | {row['decode_tokens_per_s']:.1f} | "
                     f"{row['vs_dense']:.2f}× | {row['prefill_ms']:.0f} | {row['cache_bytes_per_token']} | {row['cache_mib']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
