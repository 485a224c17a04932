"""Foundation benchmark: dense vs uniform-ratio compression of the embedded SmolLM2-135M.

Each compression runs as its own `asvd compress --allocation A` process (A = `--allocation`,
default uniform: the committed table), so its wall time and peak RSS (from the saved
asvd_report.json) are its own. Writes a markdown table.

    python benchmarks/foundation.py      # writes benchmarks/results/foundation.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's asvd_passes, whatever is installed
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def asvd(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "asvd_passes.cli", *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return result.stdout


def evaluate(model: str, windows: int, seqlen: int) -> dict:
    out = asvd("eval", model, "--data", str(DATA / "wiki.test.raw"), "--seqlen", str(seqlen), "--windows", str(windows), "--json")
    return json.loads(out.strip().splitlines()[-1])


def full_rank_map() -> dict[str, int]:
    from asvd_passes.models import embedded_model_dir
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(embedded_model_dir())
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    per_layer = {"self_attn.q_proj": h, "self_attn.k_proj": min(h, kv), "self_attn.v_proj": min(h, kv),
                 "self_attn.o_proj": h, "mlp.gate_proj": min(h, i), "mlp.up_proj": min(h, i), "mlp.down_proj": min(h, i)}
    return {f"model.layers.{l}.{k}": v for l in range(config.num_hidden_layers) for k, v in per_layer.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "foundation.md"))
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--ratios", default="0.95")
    parser.add_argument("--methods", default="svd,asvd,whiten")
    parser.add_argument("--allocation", choices=["uniform", "strs", "fisher"], default="uniform",
                        help="rank allocation of every run (default uniform, as in the committed table; "
                             "asvd compress's own default is fisher)")
    args = parser.parse_args()
    from asvd_passes.models import EMBEDDED_DESCRIPTION

    calib = ["--calib", str(DATA / "wiki.valid.tokens"), "--calib-samples", "16", "--seqlen", str(args.seqlen), "--seed", "0",
             "--allocation", args.allocation]
    rows = []
    dense = evaluate("default", args.windows, args.seqlen)
    rows.append(("dense", "-", "1.0000", "1.0000", dense["ppl"], "-", "-"))
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(m, r, []) for r in args.ratios.split(",") for m in args.methods.split(",")]
        ranks_file = Path(tmp) / "full_rank.json"
        ranks_file.write_text(json.dumps(full_rank_map()))
        runs.append(("whiten", "full rank", ["--ranks", str(ranks_file)]))
        for method, ratio, extra in runs:
            out = Path(tmp) / f"{method}-{ratio}".replace(" ", "_")
            ratio_arg = ["--param-ratio", ratio] if ratio != "full rank" else ["--param-ratio", "1.0"]
            tick = time.perf_counter()
            asvd("compress", "--out", str(out), "--method", method, "--pipeline", "whole",  # as the table was made,
                 "--lowrank-form", "pair",
                 *ratio_arg, *calib, *extra)
            wall = time.perf_counter() - tick
            report = json.loads((out / "asvd_report.json").read_text())
            result = evaluate(str(out), args.windows, args.seqlen)
            rows.append((method, ratio, f"{report['selected_ratio']:.4f}", f"{report['model_ratio']:.4f}", result["ppl"],
                         f"{report['seconds']['compress']:.1f} ({wall:.0f} with load)", f"{report['peak_rss_mib']:.0f}"))
            print(rows[-1], flush=True)

    lines = [
        f"Model: {EMBEDDED_DESCRIPTION}. "
        f"Perplexity: WikiText-2 test, seqlen {args.seqlen}, {dense['windows']} windows ({dense['tokens']} tokens). "
        f"Calibration: 16×{args.seqlen} validation windows, seed 0. Allocation `{args.allocation}`"
        + (" (one ratio for every projection)." if args.allocation == "uniform" else "."),
        "",
        "| method | requested ratio | achieved ratio (selected) | achieved ratio (whole model) | perplexity | compression s (calibration + decomposition) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {r} | {a} | {w} | {p:.2f} | {t} | {mem} |" for m, r, a, w, p, t, mem in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
