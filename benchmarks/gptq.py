"""GPTQ vs round-to-nearest on MatMulNBits' grid: SmolLM2-135M int4 ONNX size and ONNX Runtime perplexity.

Each row runs the commands a user runs, one after another:

    asvd compress --out W/asvd-09 --param-ratio 0.9 --calib wiki.valid.tokens      (ASVD rows only, once)
    asvd quantize SOURCE --out W/NAME --algorithm gptq|rtn --block-size B --calib wiki.valid.tokens
    asvd export onnx W/NAME --out W/NAME-onnx --weights int4 --block-size B
    asvd eval W/NAME-onnx --data wiki.test.raw --windows 30 --json           (perplexity by ONNX Runtime)

``rtn`` through ``asvd quantize`` is ORT's own rounding (bit-identical codes; tests/quantization), so
its rows are the round-to-nearest anchor of the same run. MiB: ``model.onnx`` on disk (MiB = 2^20 B).

    python benchmarks/gptq.py                          # every row → benchmarks/results/gptq.{md,json}
    python benchmarks/gptq.py --rows dense-gptq-32     # some rows (merged into the JSON)
    python benchmarks/gptq.py --render
    python benchmarks/gptq.py --matrices               # per-matrix output error: RTN, ORT's HQQ, GPTQ

``--matrices``: for the Linears of a few dense SmolLM2 blocks, ‖(W − Q)X‖² / ‖WX‖² on calibration
inputs (4×512 validation windows) for RTN and GPTQ (MatMulNBits' integer zero points) and for ONNX
Runtime's ``HQQWeightOnlyQuantizer`` (float zero points: 4 more bytes per block than RTN's ½).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
RESULTS = ROOT / "benchmarks" / "results"
CALIB = ["--calib", str(DATA / "wiki.valid.tokens"), "--calib-samples", "16", "--seqlen", "512", "--seed", "0"]

ROWS = {  # name → (source, algorithm, block size)
    "dense-rtn-32": ("dense", "rtn", 32),
    "dense-gptq-noclip-32": ("dense", "gptq --no-clip", 32),
    "dense-gptq-32": ("dense", "gptq", 32),
    "dense-gptq-64": ("dense", "gptq", 64),
    "dense-gptq-128": ("dense", "gptq", 128),
    "asvd09-rtn-32": ("asvd-09", "rtn", 32),
    "asvd09-gptq-32": ("asvd-09", "gptq", 32),
}


def log(message: str) -> None:
    print(f"[gptq {time.strftime('%H:%M:%S')}] {message}", flush=True)


def asvd(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "asvd_passes.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"asvd {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def source_folder(source: str, workdir: Path) -> str:
    if source == "dense":
        return "default"
    folder = workdir / source
    if not (folder / "config.json").is_file():
        log(f"compress {source}")
        asvd("compress", "--out", str(folder), "--overwrite", "--param-ratio", "0.9", *CALIB)
    return str(folder)


def measure(name: str, workdir: Path) -> dict:
    source, algorithm, block = ROWS[name]
    quantized, onnx_dir = workdir / name, workdir / f"{name}-onnx"
    log(f"{name}: quantize")
    tick = time.perf_counter()
    asvd("quantize", source_folder(source, workdir), "--out", str(quantized), "--overwrite", "--weights", "int4",
         "--algorithm", *algorithm.split(), "--block-size", str(block), *CALIB)
    seconds = time.perf_counter() - tick
    log(f"{name}: export")
    asvd("export", "onnx", str(quantized), "--out", str(onnx_dir), "--overwrite", "--weights", "int4",
         "--block-size", str(block))
    meta = json.loads((onnx_dir / "asvd_onnx.json").read_text())
    log(f"{name}: eval")
    ppl = json.loads(asvd("eval", str(onnx_dir), "--data", str(DATA / "wiki.test.raw"), "--windows", "30",
                          "--json").strip().splitlines()[-1])
    size = sum(p.stat().st_size for p in onnx_dir.glob("model.onnx*"))
    shutil.rmtree(quantized)
    row = {"name": name, "source": source, "algorithm": algorithm, "block_size": block, "bytes": size,
           "mib": size / 2**20, "ppl": ppl["ppl"], "quantize_seconds": seconds,
           "recorded_matrices": meta["quantized"].get("from_recorded_grids"), "ops": meta["quantized"]["ops"],
           "tied_embedding_shared": meta["quantized"]["tied_embedding_shared"]}
    log(f"{name}: {row['mib']:.1f} MiB, ppl {row['ppl']:.2f}")
    return row


def matrix_errors(layers=(0, 10, 20, 29), block: int = 32) -> dict:
    """Relative output error of RTN, HQQ (ORT's) and GPTQ per Linear of ``layers`` (dense inputs)."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    sys.path.insert(0, str(ROOT))
    from asvd_passes.data import calibration_windows
    from asvd_passes.models import load_model_and_tokenizer
    from asvd_passes.quantization import quantize_rtn
    from asvd_passes.quantization.calibrate import _GramRecorder
    from asvd_passes.quantization.gptq import gptq

    model, tokenizer = load_model_and_tokenizer(None)
    windows = calibration_windows(str(DATA / "wiki.valid.tokens"), model, tokenizer, 4, 512, 0)
    linears = {f"model.layers.{i}.{n}": m for i in layers for n, m in model.model.layers[i].named_modules()
               if type(m) is torch.nn.Linear}
    recorder = _GramRecorder(linears)
    with torch.no_grad():
        for row in windows:
            model(input_ids=row[None], use_cache=False)
    recorder.close()
    hqq = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block, bits=4))
    totals = {"rtn": 0.0, "hqq": 0.0, "gptq": 0.0}
    per_matrix = {}
    for name, module in linears.items():
        weight, gram = module.weight.detach().double(), recorder.grams[name]
        reference = float(((weight @ gram) * weight).sum())

        def error(dequantized):
            delta = weight - dequantized.double()
            return float(((delta @ gram) * delta).sum()) / reference

        codes, scales, zeros = hqq.quantize_internal(module.weight.detach().float(), bits=4, group_size=block)
        n, k = weight.shape
        hqq_weight = ((codes.float().view(n, -1, block) - zeros[..., None]) * scales[..., None]).reshape(n, -1)[:, :k]
        errors = {"rtn": error(quantize_rtn(weight.float(), 4, block).dequantize()), "hqq": error(hqq_weight),
                  "gptq": error(gptq(weight.float(), gram, 4, block).dequantize())}
        per_matrix[name] = errors
        for key, value in errors.items():
            totals[key] += value / len(linears)
        log(f"{name}: " + ", ".join(f"{k} {v:.5f}" for k, v in errors.items()))
    return {"block_size": block, "layers": list(layers), "mean_relative_output_error": totals, "per_matrix": per_matrix}


def render(rows: list[dict]) -> str:
    lines = ["# GPTQ vs round-to-nearest on MatMulNBits' grid (SmolLM2-135M, int4 ONNX)", "",
             "ONNX Runtime perplexity on wiki.test.raw (seqlen 512, 30 windows; dense fp32 28.30); calibration: "
             "16×512 windows of wiki.valid.tokens. `python benchmarks/gptq.py`.", "",
             "| model | rounding | block | MiB | ppl (ORT) |", "|---|---|---|---|---|"]
    order = list(ROWS)
    for row in sorted(rows, key=lambda r: order.index(r["name"]) if r["name"] in order else len(order)):
        lines.append(f"| {row['source']} | {row['algorithm']} | {row['block_size']} | {row['mib']:.1f} | "
                     f"{row['ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/asvd-gptq-bench"))
    parser.add_argument("--render", action="store_true", help="rebuild the table from results/gptq.json")
    parser.add_argument("--matrices", action="store_true", help="per-matrix output errors → results/gptq_matrices.json")
    args = parser.parse_args()
    if args.matrices:
        result = matrix_errors()
        (RESULTS / "gptq_matrices.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result["mean_relative_output_error"]))
        return
    path = RESULTS / "gptq.json"
    rows = {r["name"]: r for r in json.loads(path.read_text())} if path.is_file() else {}
    if not args.render:
        args.workdir.mkdir(parents=True, exist_ok=True)
        for name in args.rows:
            row = measure(name, args.workdir)
            # Read again before writing: another run may have added rows meanwhile.
            rows = {r["name"]: r for r in json.loads(path.read_text())} if path.is_file() else {}
            rows[name] = row
            path.write_text(json.dumps(list(rows.values()), indent=2))
    (RESULTS / "gptq.md").write_text(render(list(rows.values())))
    print(render(list(rows.values())))


if __name__ == "__main__":
    main()
