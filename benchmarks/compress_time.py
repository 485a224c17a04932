"""Wall time of the README's first command's compress step, where it goes, and the quality it gives.

Each row is one ``asvd compress`` process on the embedded SmolLM2-135M at the defaults (param ratio 0.9,
whitening, Fisher allocation, sequential pipeline, 16×512 calibration windows): the default ``selfgen``
calibration and the WikiText-2 validation file. Phases come from the folder's ``asvd_report.json``
(``calibration_data``: sampling or reading the windows; ``allocate``: pass 1, the dense sweep, the
block-by-block backward and every projection's scaled SVD for its cost curve; ``factor``: pass 2);
wall time is the whole process, interpreter start and model load included. Perplexity: ``asvd eval``
(PyTorch, wiki.test.raw, seqlen 512, 30 windows) beside the dense model's from the same run.

    python benchmarks/compress_time.py --workdir /tmp/compress-time   # writes benchmarks/results/compress_time.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
ROWS = {"selfgen (default)": [], "wiki.valid.tokens": ["--calib", str(DATA / "wiki.valid.tokens")]}


def asvd(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "asvd_passes.cli", *args], check=True, cwd=ROOT)


def perplexity(model: str) -> float:
    out = subprocess.run([sys.executable, "-m", "asvd_passes.cli", "eval", model, "--data", str(DATA / "wiki.test.raw"),
                          "--windows", "30", "--json"], check=True, cwd=ROOT, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["ppl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="scratch folder for the compressed models (replaced)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    rows = []
    for label, extra in ROWS.items():
        out = workdir / label.split()[0]
        tick = time.perf_counter()
        asvd("compress", "--out", str(out), *extra)
        wall = time.perf_counter() - tick
        report = json.loads((out / "asvd_report.json").read_text())
        seconds = report["seconds"]
        rows.append({"calibration": label, "wall_s": round(wall, 1),
                     **{key: round(seconds[key], 1) for key in ("calibration_data", "allocate", "factor", "compress")},
                     "peak_rss_mib": round(report["peak_rss_mib"]),
                     "ppl": round(perplexity(str(out)), 2)})
        print(rows[-1], flush=True)
    dense = round(perplexity("default"), 2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compress_time.json").write_text(json.dumps({"rows": rows, "dense_ppl": dense}, indent=2))
    lines = [f"# `asvd compress` at the defaults: wall time by phase ({platform.machine()}, "
             f"{os.cpu_count()} CPUs, `python benchmarks/compress_time.py`)", "",
             "SmolLM2-135M, param ratio 0.9, 16×512 calibration windows; perplexity: wiki.test.raw, seqlen 512, "
             f"30 windows (PyTorch); dense **{dense}** in the same run.", "",
             "| calibration | process wall s | calibration data s | pass 1 (allocate) s | pass 2 (factor) s "
             "| compress s (report) | peak RSS MiB | perplexity |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['calibration']} | {r['wall_s']} | {r['calibration_data']} | {r['allocate']} | {r['factor']} "
                     f"| {r['compress']} | {r['peak_rss_mib']} | {r['ppl']} |")
    (RESULTS / "compress_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
