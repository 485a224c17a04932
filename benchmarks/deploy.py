"""Deployment frontier: ONNX size, ONNX Runtime perplexity and speed of SmolLM2-135M exports, beside
onnxruntime-genai's model builder (the anchor: what a user deploying with ONNX Runtime gets today).

Rows (groups for ``--only``):
- ``dense``: the dense model as fp32 / int8 / int4 ONNX (ONNX Runtime's MatMulNBits quantizer, block 32,
  accuracy level 4; also int4 at block 64);
- ``asvd``: ASVD param 0.9 / 0.8 (weights only), the same weight formats;
- ``kv``: ASVD 0.9 / 0.8 + latent KV 0.5 (fp32 / int8 / int4);
- ``quantized``: ``asvd quantize`` of the dense model (GPTQ, calibrated on 16×512 validation windows):
  int4 block 32; with block offsets (each block on its own [min, max] grid; the LM head and embedding
  keep integer zero points); and ``--budget-mib 82.5`` (the builder's int4 file size) and 70.1 (15% below
  it), each matrix's bits (2/4/8), block size and offsets chosen by predicted loss; exported with the
  recorded codes, once in our graph and once in the builder's (``--graph builder``: its fused attention and
  norms, our MatMulNBits);
- ``builder``: ``python -m onnxruntime_genai.models.builder -i DENSE -o OUT -p P -e cpu`` from the same dense
  folder: fp32, int8, int4 (its defaults: block 32, symmetric, accuracy level 4), int4 with its best quality
  setting (``algo_config=k_quant matmul_mixed_precision=last_matmul:int8,mixed_layers:int8``), and fp32
  weights with an int8 per-tensor / int4 per-channel KV cache whose static scales the builder's own
  calibration tool (``onnxruntime_genai.models.quantization.kv_cache_calibration``, its defaults) computes on
  the builder's fp32 model over the validation split;
- ``graphs``: the fp32 exports of the dense model and ASVD 0.9 / 0.8 in both graphs: ours (torch.onnx) and the
  builder's (``--graph builder``: its fused attention and norms, each low-rank projection as two MatMuls);
- ``layouts``: a second table comparing the latent-cache layouts for genai against our own layout. (The
  committed table's equal-width KV plan row, committed in b67f503, came from an option since removed.)

Every export of ours uses the onnxruntime-genai layout (what users deploy). Every row is measured by one
runner (``exporters.ONNXDecoder``, one ONNX Runtime session, CPU EP): file size, perplexity on
wiki.test.raw (seqlen 512, 30 windows), bytes a token adds to the KV cache as stored, prefill ms of 512
tokens and greedy decode tokens/s after 128 and 2048 tokens of context (batch 1, the cache fed back as
graph inputs each step, best of N, rows interleaved per repeat so machine noise hits all alike).

    python benchmarks/deploy.py                   # writes benchmarks/results/deploy.{md,json}
    python benchmarks/deploy.py --only builder,dense  # a subset: writes results/deploy_builder_dense.{md,json}
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
K_QUANT_MIXED = ("algo_config=k_quant", "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8")
BUILDER_MODELS = {  # (model, weights) label → (precision, --extra_options, KV cache scheme calibrated on validation text)
    ("builder", "fp32"): ("fp32", (), None),
    ("builder", "int8/32"): ("int8", (), None),
    ("builder", "int4/32"): ("int4", (), None),
    ("builder", "int4/32 k-quant mixed"): ("int4", K_QUANT_MIXED, None),
    ("builder + int8 KV (per tensor)", "fp32"): ("fp32", (), "int8_per_tensor"),
    ("builder + int4 KV (per channel)", "fp32"): ("fp32", (), "int4_per_channel"),
}
QUANTIZED_MODELS = {  # (model, weights) label → asvd quantize options: (block offsets, --budget-mib)
    ("dense GPTQ", "int4/32"): (False, None),
    ("dense GPTQ + block offsets", "int4/32"): (True, None),
    ("dense GPTQ, budget 82.5 MiB", "mixed"): (False, 82.5),
    ("dense GPTQ, budget 70.1 MiB", "mixed"): (False, 70.1),
}
GRAPH_MODELS = ("dense", "ASVD 0.9", "ASVD 0.8")  # the graphs group: fp32 in our graph and in the builder's
GROUPS = ("dense", "asvd", "kv", "quantized", "builder", "graphs", "layouts")


def group_of(label: str) -> str:
    param, kv = MODELS[label]
    return "dense" if param is None else "kv" if kv else "asvd"


def slug(text: str) -> str:
    return text.replace(" + ", "_").replace(" ", "_").replace(".", "")


def log(message: str) -> None:
    print(f"[deploy {time.strftime('%H:%M:%S')}] {message}", flush=True)


def compress(label: str, workdir: Path, model: str | None = None) -> Path:
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
    ASVDCompressor.from_pretrained(model).compress(config, save_dir=folder, progress=False)
    log(f"compressed {label} in {time.perf_counter() - tick:.0f} s")
    return folder


def export_once(source, folder: Path, what: str, **options) -> Path:
    """``export_onnx(source, folder, **options)`` unless an earlier run left ``folder/model.onnx``."""
    from exporters import export_onnx

    if not (folder / "model.onnx").is_file():
        tick = time.perf_counter()
        export_onnx(source, folder, overwrite=True, **options)
        log(f"exported {what} in {time.perf_counter() - tick:.0f} s")
    return folder


def build_exports(workdir: Path, args) -> dict[tuple[str, str], Path]:
    exports = {}
    for label in MODELS:
        if group_of(label) not in args.only:
            continue
        source = args.model if label == "dense" else compress(label, workdir, args.model)
        for weights in (WEIGHTS_WITH_KV if MODELS[label][1] else WEIGHTS):
            kind, _, block = weights.partition("/")
            folder = export_once(source, workdir / "onnx" / f"{slug(label)}-{weights.replace('/', '-b')}",
                                 f"{label} {weights}", layout="genai", weights=kind,
                                 block_size=int(block or args.block_size))
            exports[(label, weights if "/" in weights or weights == "fp32" else f"{weights}/{args.block_size}")] = folder
    return exports


def build_graphs(workdir: Path, args) -> dict[tuple[str, str], Path]:
    """fp32 exports of the dense model and the weight-only ASVD models in our graph and the builder's."""
    from asvd_passes.models import local_model_folder

    exports = {}
    for label in GRAPH_MODELS:
        source = str(local_model_folder(args.model)) if label == "dense" else str(compress(label, workdir, args.model))
        for graph, suffix in (("asvd", ""), ("builder", "-builder-graph")):
            exports[(label + (", builder graph" if suffix else ""), "fp32")] = export_once(
                source, workdir / "onnx" / f"{slug(label)}-fp32{suffix}", f"{label} fp32 in the {graph} graph",
                layout="genai", weights="fp32", graph=graph)
    return exports


def build_quantized(workdir: Path, args) -> dict[tuple[str, str], Path]:
    """``asvd quantize`` then ``asvd export onnx --weights int4`` (genai layout), as a user runs them."""
    from asvd_passes.cli import quantize_folder
    from exporters import export_onnx

    exports = {}
    for key, (offsets, budget) in QUANTIZED_MODELS.items():
        name = slug(key[0]).replace(",", "")
        folder, onnx_dir = workdir / "quantized" / name, workdir / "onnx" / f"{name}-{key[1].replace('/', '-b')}"
        if not (onnx_dir / "model.onnx").is_file():
            tick = time.perf_counter()
            quantize_folder(args.model, folder, "int4", 32, "gptq", 0.01, str(DATA / "wiki.valid.tokens"),
                            16, 512, 0, overwrite=True, offsets=offsets, budget_mib=budget, progress=False)
            export_onnx(str(folder), onnx_dir, layout="genai", weights="int4", block_size=32, overwrite=True)
            log(f"quantized and exported {key[0]} in {time.perf_counter() - tick:.0f} s")
        exports[key] = onnx_dir
        # The same grids in onnxruntime-genai's builder's graph (fused attention and norms): --graph builder.
        exports[(f"{key[0]}, builder graph", key[1])] = export_once(
            str(folder), onnx_dir.with_name(onnx_dir.name + "-builder-graph"), f"{key[0]} in the builder's graph",
            weights="int4", graph="builder")
    return exports


def run_builder(dense: Path, out: Path, precision: str, extra_options: tuple[str, ...]) -> None:
    """``python -m onnxruntime_genai.models.builder`` as a user runs it (its own process, CPU EP)."""
    import subprocess

    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(dense), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(out.parent / "builder-cache")]
    if extra_options:
        command += ["--extra_options", *extra_options]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not (out / "model.onnx").is_file():
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")


def calibrate_kv_scales(model: Path, tokenizer: Path, scheme: str, out: Path, args) -> Path:
    """The builder's own KV calibration (its default method) on the builder's fp32 model, over validation text."""
    from onnxruntime_genai.models.quantization.kv_cache_calibration import calibrate_kv_scales as calibrate

    if not out.is_file():
        corpus = [(DATA / "wiki.valid.tokens").read_text()]  # one passage: its first windows are used
        calibrate(str(model / "model.onnx"), str(tokenizer), str(out), quant_type=scheme, target_seq=args.seqlen,
                  corpus=corpus)
    return out


def build_builder_models(workdir: Path, args) -> dict[tuple[str, str], Path]:
    """onnxruntime-genai's model builder run on the same dense folder: the anchor rows."""
    from asvd_passes.models import local_model_folder

    dense = local_model_folder(args.model)
    root = workdir / "builder"
    folders = {}
    for index, (key, (precision, extra, scheme)) in enumerate(BUILDER_MODELS.items()):
        folder = root / f"{index}-{precision}{'-' + scheme if scheme else ''}"
        if not (folder / "model.onnx").is_file():
            tick = time.perf_counter()
            options = extra
            if scheme:
                plain = folders[("builder", "fp32")]
                scales = calibrate_kv_scales(plain, dense, scheme, root / f"kv-scales-{scheme}.json", args)
                options = (*extra, f"kv_cache_quant_scheme={scheme}", f"kv_cache_scale_file={scales}")
            shutil.rmtree(folder, ignore_errors=True)
            run_builder(dense, folder, precision, options)
            log(f"builder {key[0]} {key[1]} in {time.perf_counter() - tick:.0f} s")
        folders[key] = folder
    return folders


def file_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("model.onnx*")) / 2**20


def measure_speed(runtime, context: int, steps: int, tokens: np.ndarray) -> float:
    """Greedy decode tokens/s after ``context`` tokens (the prefill is not timed)."""
    logits, past = runtime.forward(tokens[None, :context], runtime.empty_cache(1))
    following = logits[:, -1].argmax(-1)[:, None]
    tick = time.perf_counter()
    for step in range(steps):
        logits, past = runtime.forward(following, past, position=context + step)
        following = logits[:, -1].argmax(-1)[:, None]
    return steps / (time.perf_counter() - tick)


def measure_prefill(runtime, length: int, tokens: np.ndarray) -> float:
    tick = time.perf_counter()
    runtime.forward(tokens[None, :length], runtime.empty_cache(1))
    return (time.perf_counter() - tick) * 1000


def speed_tokens(folder: Path) -> np.ndarray:
    """Real text (the start of wiki.test.raw) as prompt and context tokens for the speed runs."""
    from transformers import AutoTokenizer

    text = (DATA / "wiki.test.raw").read_text()[:60000]
    return np.asarray(AutoTokenizer.from_pretrained(folder)(text)["input_ids"], dtype=np.int64)


def export_details(folder: Path) -> dict:
    """What our export's metadata says about its quantization (nothing for the builder's folders)."""
    from exporters.onnx_export import METADATA_FILE

    if not (folder / METADATA_FILE).is_file():
        return {}
    quantized = json.loads((folder / METADATA_FILE).read_text()).get("quantized") or {}
    return {"float_weight_matmuls": len(quantized.get("float_weight_matmuls", [])),
            "tied_embedding_shared": quantized.get("tied_embedding_shared"),
            "accuracy_level": quantized.get("accuracy_level")}


def measure(exports: dict, args) -> list[dict]:
    from exporters import ONNXDecoder

    tokens = speed_tokens(next(iter(exports.values())))
    rows = {}
    for key, folder in exports.items():
        runtime = ONNXDecoder(folder, threads=args.threads)
        tick = time.perf_counter()
        ppl = runtime.perplexity(str(DATA / "wiki.test.raw"), seqlen=args.seqlen, windows=args.windows, progress=False)
        rows[key] = {"model": key[0], "weights": key[1], "size_mb": file_mb(folder), "ppl": ppl["ppl"],
                     "windows": ppl["windows"], "seqlen": ppl["seqlen"],
                     "cache_bytes_per_token": runtime.cache_bytes_per_token(), **export_details(folder),
                     "decode": {}, "prefill_ms": None}
        log(f"{key[0]} {key[1]}: {rows[key]['size_mb']:.1f} MiB, ppl {ppl['ppl']:.2f} ({time.perf_counter() - tick:.0f} s)")
        del runtime
    save(args, list(rows.values()), [])  # a run cut off later still leaves these rows
    if args.skip_speed:
        return list(rows.values())
    # One session at a time: twenty-odd sessions with 2048-token arenas do not fit in memory together.
    for repeat in range(args.repeats):  # interleaved: every row once per repeat
        for key, folder in exports.items():
            runtime, row = ONNXDecoder(folder, threads=args.threads), rows[key]
            row["prefill_ms"] = min(row["prefill_ms"] or 1e18, measure_prefill(runtime, args.prefill, tokens))
            for context in args.contexts:
                speed = measure_speed(runtime, context, args.steps, tokens)
                row["decode"][str(context)] = max(row["decode"].get(str(context), 0.0), speed)
            del runtime
        log(f"speed repeat {repeat + 1}/{args.repeats} done")
    return list(rows.values())


def layout_study(workdir: Path, args) -> list[dict]:
    """Latent KV 0.5 (with ASVD 0.9) for genai: packing vs zero-padding, vs our layout."""
    from exporters import ONNXDecoder, export_onnx
    from exporters.onnx_export import packed_width

    label = "ASVD 0.9 + KV 0.5"
    free = compress(label, workdir, args.model)
    variants = {
        "ours (asvd layout)": (free, "asvd"),
        "genai: packed k,v halves (chosen)": (free, "genai"),
    }
    rows, folders = [], {}
    for index, (name, (model_dir, layout)) in enumerate(variants.items()):
        folder = workdir / "onnx" / f"layout-{index}-{layout}"
        if not (folder / "model.onnx").is_file():
            export_onnx(model_dir, folder, layout=layout, overwrite=True)
        runtime = ONNXDecoder(folder, threads=args.threads)
        ppl = runtime.perplexity(str(DATA / "wiki.test.raw"), seqlen=args.seqlen, windows=args.windows, progress=False)
        kv = json.loads((model_dir / "config.json").read_text())["quantization_config"]["kv"]["layers"]
        latent = sum(sum(roles["key"]) + sum(roles["value"]) for roles in kv.values())
        padded = sum(2 * max(sum(roles["key"]), sum(roles["value"])) for roles in kv.values())
        packed = sum(2 * packed_width(sum(roles["key"]), sum(roles["value"])) for roles in kv.values())
        rows.append({"variant": name, "ppl": ppl["ppl"], "cache_bytes_per_token": runtime.cache_bytes_per_token(),
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
                runtime = ONNXDecoder(folders[row["variant"]], threads=args.threads)
                for context in args.contexts:
                    speed = measure_speed(runtime, context, args.steps, tokens)
                    row["decode"][str(context)] = max(row["decode"].get(str(context), 0.0), speed)
    return rows


def results_stem(only: list[str]) -> str:
    """``deploy`` for the whole benchmark; a subset writes beside it, never over the full table."""
    return "deploy" if set(only) == set(GROUPS) else "deploy_" + "_".join(g for g in GROUPS if g in only)


def save(args, rows: list[dict], layouts: list[dict]) -> dict:
    import os
    import platform

    import onnxruntime

    from asvd_passes.models import EMBEDDED_DESCRIPTION

    result = {
        "settings": {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
                     "model": args.model or EMBEDDED_DESCRIPTION,
                     "onnxruntime": onnxruntime.__version__, "threads": args.threads, "seqlen": args.seqlen,
                     "contexts": args.contexts, "steps": args.steps, "repeats": args.repeats, "block_size": args.block_size,
                     "prefill": args.prefill, "only": args.only},
        "rows": rows,
        "layouts": layouts,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = results_stem(args.only)
    (args.results / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.results / f"{stem}.md").write_text(render(result))
    return result


def render(result: dict) -> str:
    settings = result["settings"]
    contexts = settings["contexts"]
    # Sizes relative to our dense fp32 export (the builder's fp32 model when the run left ours out).
    reference = next((r for r in result["rows"] if r["model"] == "dense" and r["weights"] == "fp32"),
                     next((r for r in result["rows"] if r["weights"] == "fp32"), None))
    windows = result["rows"][0]["windows"] if result["rows"] else "-"
    prefill = settings.get("prefill", 512)
    lines = [
        f"Model: {settings.get('model', 'SmolLM2-135M-Instruct')}. "
        f"Measured {settings['date']} on {settings['machine']}; ONNX Runtime {settings['onnxruntime']} "
        f"CPU EP, {settings['threads']} threads, every row by one runner (one session, the cache fed back as graph "
        f"inputs each step); perplexity by ONNX Runtime on wiki.test.raw, seqlen {settings['seqlen']}, {windows} windows; "
        f"decode: batch 1, {settings['steps']} greedy steps after C tokens, best of {settings['repeats']}, rows interleaved; "
        "int8/int4: MatMulNBits, `/N` = block size N, accuracy level 4 (int8 compute) in ours and the builder's. "
        "`builder`: onnxruntime-genai's model builder on the same dense folder in the same run "
        "(`-p fp32|int8|int4 -e cpu`; k-quant mixed: `--extra_options " + " ".join(K_QUANT_MIXED) + "`; KV: "
        "`kv_cache_quant_scheme=... kv_cache_scale_file=...`, scales from its calibration tool on wiki.valid.tokens).",
        "",
        f"| model | weights | ONNX MiB | size vs {'dense' if reference and reference['model'] == 'dense' else 'builder'} fp32 "
        f"| perplexity (ORT) | cache B/token | prefill {prefill} ms | "
        + " | ".join(f"decode tok/s C={c}" for c in contexts) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(contexts),
    ]
    for row in result["rows"]:
        speeds = " | ".join(f"{row['decode'][str(c)]:.1f}" if row["decode"] else "-" for c in contexts)
        prefill_ms = f"{row['prefill_ms']:.0f}" if row["prefill_ms"] else "-"
        ratio = f"{row['size_mb'] / reference['size_mb']:.3f}" if reference else "-"
        lines.append(f"| {row['model']} | {row['weights']} | {row['size_mb']:.1f} | {ratio} | "
                     f"{row['ppl']:.2f} | {row['cache_bytes_per_token']} | {prefill_ms} | {speeds} |")
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
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated row groups to run, of {', '.join(GROUPS)} (default: all)")
    parser.add_argument("--model", default=None, help="dense model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the .md/.json results")
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--prefill", type=int, default=512, help="tokens of the timed prefill")
    parser.add_argument("--contexts", default="128,2048")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--render", action="store_true", help="only rebuild the .md from the .json of --only's groups")
    args = parser.parse_args()
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.only = [group.strip() for group in args.only.split(",") if group.strip()]
    unknown = sorted(set(args.only) - set(GROUPS))
    if unknown:
        parser.error(f"--only: unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    if args.render:
        stem = results_stem(args.only)
        result = json.loads((args.results / f"{stem}.json").read_text())
        (args.results / f"{stem}.md").write_text(render(result))
        print(render(result))
        return 0
    import tempfile

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="asvd-deploy-"))
    if workdir.exists() and not args.reuse and any(workdir.iterdir()):
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"workdir {workdir}")
    exports = build_exports(workdir, args)
    if "quantized" in args.only:
        exports.update(build_quantized(workdir, args))
    if "graphs" in args.only:
        exports.update(build_graphs(workdir, args))
    if "builder" in args.only:
        exports.update(build_builder_models(workdir, args))
    rows = measure(exports, args) if exports else []
    save(args, rows, [])
    layouts = layout_study(workdir, args) if "layouts" in args.only else []
    print(render(save(args, rows, layouts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
