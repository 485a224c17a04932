"""Deployment frontier: ONNX size, ONNX Runtime perplexity and speed of SmolLM2-135M exports.

Rows: dense, ASVD param 0.9 / 0.8 (weights only), and ASVD 0.9 / 0.8 + latent KV 0.5, each as
fp32 / int8 / int4 ONNX (ONNX Runtime's MatMulNBits quantizer, block 32; weight-only models also int4
at block 64). Every export uses the
onnxruntime-genai layout (what users deploy). For each row: file size, perplexity computed by
ONNX Runtime on the export (wiki.test.raw, seqlen 512, 30 windows), prefill ms of 512 tokens and
greedy decode tokens/s after 128 and 2048 tokens of context (CPU EP, batch 1, best of N, rows
interleaved per repeat so machine noise hits all alike). A second table compares the latent-cache
layouts for genai (packing, zero-padding) against our own layout. (The committed table's equal-width
KV plan row, committed in b67f503, came from an option since removed: it lost 6.5 perplexity.)

    python benchmarks/deploy.py                   # writes benchmarks/results/deploy.{md,json}
    python benchmarks/deploy.py --workdir W --reuse   # re-measure exports an earlier run left in W
    python benchmarks/deploy.py --render          # rebuild the tables from results/deploy.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
RESULTS = ROOT / "benchmarks" / "results"

MODELS = {  # label → (param_ratio, kv_ratio)
    "dense": (None, None),
    "ASVD 0.9": (0.9, None),
    "ASVD 0.8": (0.8, None),
    "ASVD 0.9 + KV 0.5": (0.9, 0.5),
    "ASVD 0.8 + KV 0.5": (0.8, 0.5),
}
WEIGHTS = ("fp32", "int8", "int4", "int4/64")  # "/N": block size N instead of --block-size
WEIGHTS_WITH_KV = ("fp32", "int8", "int4")  # the block-64 point is shown for weight-only models


def slug(text: str) -> str:
    return text.replace(" + ", "_").replace(" ", "_").replace(".", "")


def log(message: str) -> None:
    print(f"[deploy {time.strftime('%H:%M:%S')}] {message}", flush=True)


def compress(label: str, workdir: Path) -> Path:
    """The compressed model folder of ``label`` (whiten + fisher, calibration 16×512 validation windows)."""
    from asvd_passes import ASVDCompressor, ASVDConfig

    folder = workdir / "models" / slug(label)
    if (folder / "config.json").is_file():
        return folder
    param, kv = MODELS[label]
    tick = time.perf_counter()
    config = ASVDConfig(method="whiten", param_ratio=param, kv_ratio=kv, calibration=str(DATA / "wiki.valid.tokens"),
                        calib_samples=16, seqlen=512, seed=0,
                        pipeline="whole", lowrank_form="pair")  # the committed table was made on the whole-model path, in pairs
    ASVDCompressor.from_pretrained(None).compress(config, save_dir=folder, progress=False)
    log(f"compressed {label} in {time.perf_counter() - tick:.0f} s")
    return folder


def build_exports(workdir: Path, args) -> dict[tuple[str, str], Path]:
    from exporters import export_onnx

    exports = {}
    for label in MODELS:
        source = None if label == "dense" else compress(label, workdir)
        for weights in (WEIGHTS_WITH_KV if MODELS[label][1] else WEIGHTS):
            folder = workdir / "onnx" / f"{slug(label)}-{weights.replace('/', '-b')}"
            if not (folder / "model.onnx").is_file():
                tick = time.perf_counter()
                kind, _, block = weights.partition("/")
                export_onnx(source, folder, layout="genai", weights=kind, block_size=int(block or args.block_size))
                log(f"exported {label} {weights} in {time.perf_counter() - tick:.0f} s")
            exports[(label, weights)] = folder
    return exports


def file_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("model.onnx*")) / 2**20


def measure_speed(runtime, context: int, steps: int, tokens: np.ndarray) -> float:
    """Greedy decode tokens/s after ``context`` tokens (the prefill is not timed)."""
    ids = tokens[None, :context]
    mask = np.ones_like(ids)
    positions = np.arange(context)[None]
    logits, past = runtime.forward(ids, mask, positions, runtime.empty_cache(1))
    following = logits[:, -1].argmax(-1)[:, None]
    tick = time.perf_counter()
    for step in range(steps):
        mask = np.ones((1, context + step + 1), dtype=np.int64)
        logits, past = runtime.forward(following, mask, np.array([[context + step]]), past)
        following = logits[:, -1].argmax(-1)[:, None]
    return steps / (time.perf_counter() - tick)


def measure_prefill(runtime, length: int, tokens: np.ndarray) -> float:
    ids = tokens[None, :length]
    tick = time.perf_counter()
    runtime.forward(ids, np.ones_like(ids), np.arange(length)[None], runtime.empty_cache(1))
    return (time.perf_counter() - tick) * 1000


def cache_bytes_per_token(runtime) -> int:
    return sum(4 * int(np.prod(shape)) for shape in (runtime._shape(e, 1, 1) for e in runtime.metadata.cache))


def speed_tokens(folder: Path) -> np.ndarray:
    """Real text (the start of wiki.test.raw) as prompt and context tokens for the speed runs."""
    from transformers import AutoTokenizer

    text = (DATA / "wiki.test.raw").read_text()[:60000]
    return np.asarray(AutoTokenizer.from_pretrained(folder)(text)["input_ids"], dtype=np.int64)


def measure(exports: dict, args) -> list[dict]:
    from exporters import ORTCausalLM

    tokens = speed_tokens(next(iter(exports.values())))
    rows = {}
    for key, folder in exports.items():
        runtime = ORTCausalLM(folder, threads=args.threads)
        tick = time.perf_counter()
        ppl = runtime.perplexity(str(DATA / "wiki.test.raw"), seqlen=args.seqlen, windows=args.windows, progress=False)
        meta = runtime.metadata
        rows[key] = {"model": key[0], "weights": key[1] if "/" in key[1] or key[1] == "fp32" else f"{key[1]}/{args.block_size}",
                     "size_mb": file_mb(folder), "ppl": ppl["ppl"],
                     "windows": ppl["windows"], "seqlen": ppl["seqlen"], "cache_bytes_per_token": cache_bytes_per_token(runtime),
                     "float_weight_matmuls": len(meta.quantized.get("float_weight_matmuls", [])),
                     "tied_embedding_shared": meta.quantized.get("tied_embedding_shared"),
                     "decode": {}, "prefill_ms": None}
        log(f"{key[0]} {key[1]}: {rows[key]['size_mb']:.1f} MiB, ppl {ppl['ppl']:.2f} ({time.perf_counter() - tick:.0f} s)")
        del runtime
    save(args, list(rows.values()), [])  # a run cut off later still leaves these rows
    if args.skip_speed:
        return list(rows.values())
    # One session at a time: eighteen sessions with 2048-token arenas do not fit in 24 GiB together.
    for repeat in range(args.repeats):  # interleaved: every row once per repeat
        for key, folder in exports.items():
            runtime, row = ORTCausalLM(folder, threads=args.threads), rows[key]
            row["prefill_ms"] = min(row["prefill_ms"] or 1e18, measure_prefill(runtime, 512, tokens))
            for context in args.contexts:
                speed = measure_speed(runtime, context, args.steps, tokens)
                row["decode"][str(context)] = max(row["decode"].get(str(context), 0.0), speed)
            del runtime
        log(f"speed repeat {repeat + 1}/{args.repeats} done")
    return list(rows.values())


def layout_study(workdir: Path, args) -> list[dict]:
    """Latent KV 0.5 (with ASVD 0.9) for genai: packing vs zero-padding, vs our layout."""
    from exporters import ORTCausalLM, export_onnx
    from exporters.onnx_export import packed_width

    label = "ASVD 0.9 + KV 0.5"
    free = compress(label, workdir)
    variants = {
        "ours (asvd layout)": (free, "asvd"),
        "genai: packed k,v halves (chosen)": (free, "genai"),
    }
    rows, folders = [], {}
    for index, (name, (model_dir, layout)) in enumerate(variants.items()):
        folder = workdir / "onnx" / f"layout-{index}-{layout}"
        if not (folder / "model.onnx").is_file():
            export_onnx(model_dir, folder, layout=layout)
        runtime = ORTCausalLM(folder, threads=args.threads)
        ppl = runtime.perplexity(str(DATA / "wiki.test.raw"), seqlen=args.seqlen, windows=args.windows, progress=False)
        kv = json.loads((model_dir / "config.json").read_text())["quantization_config"]["kv"]["layers"]
        latent = sum(sum(roles["key"]) + sum(roles["value"]) for roles in kv.values())
        padded = sum(2 * max(sum(roles["key"]), sum(roles["value"])) for roles in kv.values())
        packed = sum(2 * packed_width(sum(roles["key"]), sum(roles["value"])) for roles in kv.values())
        rows.append({"variant": name, "ppl": ppl["ppl"], "cache_bytes_per_token": cache_bytes_per_token(runtime),
                     "latent_columns": latent, "packed_columns": packed, "padded_columns": padded, "decode": {}})
        folders[name] = folder
        del runtime
        log(f"layout {name}: ppl {ppl['ppl']:.2f}, cache {rows[-1]['cache_bytes_per_token']} B/token")
    # Zero-padding: the packed graph's numbers with the narrower latent padded to the wider one. Quality is
    # that of the free plan by construction (zeros add nothing to a dot product); the cache grows to
    # Σ 2·max(r_k, r_v). Its speed is not measured: the same compute over a larger cache than packing.
    free_row = next(r for r in rows if r["variant"].startswith("genai: packed"))
    rows.append({"variant": "genai: zero-pad narrower latent", "ppl": free_row["ppl"],
                 "cache_bytes_per_token": 4 * free_row["padded_columns"], "latent_columns": free_row["latent_columns"],
                 "packed_columns": None, "padded_columns": free_row["padded_columns"], "decode": None})
    tokens = speed_tokens(free)
    if not args.skip_speed:
        for _ in range(args.repeats):
            for row in rows:
                if row["decode"] is None:
                    continue
                runtime = ORTCausalLM(folders[row["variant"]], threads=args.threads)
                for context in args.contexts:
                    speed = measure_speed(runtime, context, args.steps, tokens)
                    row["decode"][str(context)] = max(row["decode"].get(str(context), 0.0), speed)
    return rows


def save(args, rows: list[dict], layouts: list[dict]) -> dict:
    import os
    import platform

    import onnxruntime

    result = {
        "settings": {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
                     "onnxruntime": onnxruntime.__version__, "threads": args.threads, "seqlen": args.seqlen,
                     "contexts": args.contexts, "steps": args.steps, "repeats": args.repeats, "block_size": args.block_size},
        "rows": rows,
        "layouts": layouts,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "deploy.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "deploy.md").write_text(render(result))
    return result


def render(result: dict) -> str:
    contexts = result["settings"]["contexts"]
    dense_fp32 = next(r for r in result["rows"] if r["model"] == "dense" and r["weights"] == "fp32")
    from asvd_passes.models import EMBEDDED_DESCRIPTION

    lines = [
        f"Model: {EMBEDDED_DESCRIPTION}. "
        f"Measured {result['settings']['date']} on {result['settings']['machine']}; ONNX Runtime {result['settings']['onnxruntime']} "
        f"CPU EP, {result['settings']['threads']} threads; perplexity by ONNX Runtime on wiki.test.raw, seqlen "
        f"{result['settings']['seqlen']}, {dense_fp32['windows']} windows; decode: batch 1, {result['settings']['steps']} greedy "
        f"steps after C tokens, best of {result['settings']['repeats']}; int8/int4: MatMulNBits, `/N` = block size N.",
        "",
        "| model | weights | ONNX MiB | size vs dense fp32 | perplexity (ORT) | cache B/token | prefill 512 ms | "
        + " | ".join(f"decode tok/s C={c}" for c in contexts) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(contexts),
    ]
    for row in result["rows"]:
        speeds = " | ".join(f"{row['decode'][str(c)]:.1f}" if row["decode"] else "-" for c in contexts)
        prefill = f"{row['prefill_ms']:.0f}" if row["prefill_ms"] else "-"
        lines.append(f"| {row['model']} | {row['weights']} | {row['size_mb']:.1f} | {row['size_mb'] / dense_fp32['size_mb']:.3f} | "
                     f"{row['ppl']:.2f} | {row['cache_bytes_per_token']} | {prefill} | {speeds} |")
    if result.get("layouts"):
        lines += ["", "Latent-cache layouts for onnxruntime-genai (ASVD 0.9 + KV 0.5, fp32):", "",
                  "| layout | perplexity (ORT) | cache B/token | " + " | ".join(f"decode tok/s C={c}" for c in contexts) + " |",
                  "|---|---|---|" + "---|" * len(contexts)]
        for row in result["layouts"]:
            speeds = " | ".join(f"{row['decode'][str(c)]:.1f}" if row["decode"] else "not measured" for c in contexts)
            lines.append(f"| {row['variant']} | {row['ppl']:.2f} | {row['cache_bytes_per_token']} | {speeds} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="where models and exports go (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="reuse models/exports found in --workdir")
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--contexts", default="128,2048")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-layouts", action="store_true")
    parser.add_argument("--render", action="store_true", help="only rebuild results/deploy.md from results/deploy.json")
    args = parser.parse_args()
    args.contexts = [int(c) for c in args.contexts.split(",")]
    if args.render:
        result = json.loads((RESULTS / "deploy.json").read_text())
        (RESULTS / "deploy.md").write_text(render(result))
        print(render(result))
        return 0
    import tempfile

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="asvd-deploy-"))
    if workdir.exists() and not args.reuse and any(workdir.iterdir()):
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"workdir {workdir}")
    exports = build_exports(workdir, args)
    rows = measure(exports, args)
    save(args, rows, [])
    layouts = [] if args.skip_layouts else layout_study(workdir, args)
    print(render(save(args, rows, layouts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
