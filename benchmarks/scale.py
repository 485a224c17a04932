"""Memory and time of compression at the sizes users have: whole-model against sequential pipeline.

Every row is its own process (``asvd compress``'s Python API in a child), so its peak RSS is that
run's alone. Rows:

* the real SmolLM2-135M (WikiText-2 calibration), whole and sequential;
* random-weight Llama-shaped models written as bf16 safetensors shards, one block at a time, so
  that writing them needs no more memory than one block: a 1B width (hidden 2048, MLP 5632,
  32 heads, 4 KV heads) at 4 and 16 layers, and the 3B shape (hidden 3072, MLP 8192, 24 heads,
  8 KV heads) at ``--layers-3b`` layers. Random weights are for memory and time only, never quality.

    python benchmarks/scale.py --workdir /tmp/asvd-scale     # writes benchmarks/results/scale.{md,json}
    python benchmarks/scale.py --render benchmarks/results/scale.json

Bars (sequential, CPU): the 16-layer 1B-width model's peak RSS stays below half its fp32 size,
and exceeds the 4-layer peak by less than a quarter of that size (memory follows one block).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
GIB = 1024**3

SHAPES = {
    "1b-width": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2),  # smoke test
}


def write_random_llama(folder: Path, shape: str, layers: int, vocab: int = 32000, seed: int = 0,
                       device: str = "cpu") -> int:
    """A random Llama checkpoint in bf16 shards (one per block), made one block at a time; returns #params.

    On ``device="cuda"`` the numbers are drawn on the GPU (a 7B model's 6.7 G draws take minutes on CPU).
    """
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (folder / "config.json").is_file():
        return json.loads((folder / "params.json").read_text())["params"]
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=4096,
                         tie_word_embeddings=False, **SHAPES[shape])
    config.dtype = torch.bfloat16
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    groups: dict[str, dict[str, tuple]] = {}
    for name, param in model.named_parameters():
        group = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        groups.setdefault(group, {})[name] = tuple(param.shape)
    weight_map, total, params = {}, 0, 0
    for index, (group, tensors) in enumerate(groups.items()):
        file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        made = {}
        for name, shape_ in tensors.items():
            if name.endswith("norm.weight"):
                made[name] = torch.ones(shape_, dtype=torch.bfloat16)
            else:
                made[name] = (torch.randn(shape_, generator=generator, device=device) * 0.02).to(torch.bfloat16).cpu()
            weight_map[name] = file
            total += made[name].numel() * 2
            params += made[name].numel()
        save_file(made, str(folder / file), metadata={"format": "pt"})
        del made
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    (folder / "params.json").write_text(json.dumps({"params": params}))
    return params


def child(args) -> int:
    """One compression in this process; prints one JSON line."""
    import torch

    from asvd_passes import ASVDCompressor, ASVDConfig

    torch.manual_seed(0)
    options = dict(param_ratio=args.ratio, pipeline=args.pipeline, device=args.device,
                   calib_samples=args.calib_samples, seqlen=args.seqlen, seed=0, lowrank_form=args.lowrank_form)
    tick = time.perf_counter()
    if args.model == "smollm2":
        compressor = ASVDCompressor.from_pretrained(None)
        config = ASVDConfig(calibration=str(DATA / "wiki.valid.tokens"), **options)
        report = compressor.compress(config, save_dir=args.out, progress=args.progress)
    else:
        compressor = ASVDCompressor.from_pretrained(args.model)
        vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
        windows = torch.randint(3, vocab, (args.calib_samples, args.seqlen), generator=torch.Generator().manual_seed(0))
        report = compressor.compress(ASVDConfig(**options), calibration=windows, save_dir=args.out, progress=args.progress)
    seconds = time.perf_counter() - tick
    peak_gpu = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
    print("ROW " + json.dumps(dict(seconds=seconds, peak_rss_gib=report.peak_rss_mib / 1024, peak_gpu_gib=peak_gpu,
                                   achieved=report.selected_ratio, chosen=report.pipeline, stages=report.seconds)), flush=True)
    return 0


def run_row(label, model, pipeline, args, params, layers) -> dict:
    out = Path(args.workdir) / "out" / f"{Path(str(model)).name}-{pipeline}"
    command = [sys.executable, __file__, "--child", "--model", str(model), "--pipeline", pipeline,
               "--device", args.device, "--ratio", str(args.ratio), "--out", str(out),
               "--calib-samples", str(args.calib_samples if model != "smollm2" else 16),
               "--seqlen", str(args.seqlen if model != "smollm2" else 512), "--lowrank-form", args.lowrank_form,
               ] + (["--progress"] if args.progress else [])
    print(f"{label} / {pipeline}: {' '.join(command[2:])}", flush=True)
    tick = time.perf_counter()
    try:
        # With --progress the child's progress bars go straight to this process's stderr.
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=None if args.progress else subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        return dict(label=label, pipeline=pipeline, params=params, layers=layers,
                    error=f"stopped after {time.perf_counter() - tick:.0f} s (--row-timeout)")
    rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode != 0 or not rows:
        tail = ((done.stderr or "") + done.stdout)[-2000:]
        return dict(label=label, pipeline=pipeline, params=params, layers=layers, error=tail)
    row = dict(label=label, pipeline=pipeline, params=params, layers=layers, fp32_gib=params * 4 / GIB, **rows[0])
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", default="sequential", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default="/tmp/asvd-scale")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--lowrank-form", default="pair", choices=["pair", "interpolative"],
                        help="storage of the factors (pair: as the committed tables were made)")
    parser.add_argument("--calib-samples", type=int, default=4, help="calibration windows for the random models")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--layers-3b", type=int, default=4, help="layers of the 3B shape (28 is prohibitive on 2 cores)")
    parser.add_argument("--rows", default="smollm2,1b-4,1b-16,3b", help="which rows to run")
    parser.add_argument("--whole-for", default="smollm2,1b-4", help="rows that also run the whole-model path")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "scale"))
    parser.add_argument("--render", default=None, help="write the table from this JSON")
    parser.add_argument("--progress", action="store_true", help="show each row's progress bars")
    parser.add_argument("--row-timeout", type=float, default=None, help="stop a row after this many seconds")
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        write_table(data["rows"], data["settings"], Path(args.results))
        return 0
    import shutil

    workdir = Path(args.workdir)
    rows = []
    settings = dict(device=args.device, lowrank_form=args.lowrank_form, ratio=args.ratio, calib_samples=args.calib_samples, seqlen=args.seqlen,
                    command=" ".join(sys.argv[1:]), machine=_machine(args.device))
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    for key in args.rows.split(","):
        if key == "smollm2":
            label, model, params, layers = "SmolLM2-135M (real)", "smollm2", 134_515_008, 30
        else:
            # "1b-16": the 1B width at 16 layers; "7b-8": the 7B shape at 8 layers; "3b": at --layers-3b.
            name, _, count = key.rpartition("-") if key[-1].isdigit() and "-" in key else (key, "", "")
            shape = "1b-width" if name == "1b" else name
            layers = int(count) if count else {"3b": args.layers_3b, "7b": 32}[key]
            label = f"{shape} random, {layers} layers, bf16"
            model = workdir / "models" / f"{shape}-{layers}"
            tick = time.perf_counter()
            params = write_random_llama(model, shape, layers, device="cuda" if args.device == "cuda" else "cpu")
            print(f"wrote {model} ({params / 1e9:.2f} B params) in {time.perf_counter() - tick:.0f} s", flush=True)
        pipelines = (["whole"] if key in args.whole_for.split(",") else []) + ["sequential"]
        for pipeline in pipelines:
            rows.append(run_row(label, model, pipeline, args, params, layers))
            shutil.rmtree(workdir / "out", ignore_errors=True)
            # Written after every row, so a run stopped part-way keeps the rows it finished.
            results.with_suffix(".json").write_text(json.dumps(dict(settings=settings, rows=rows), indent=2))
    write_table(rows, settings, results)
    return 0


def _machine(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return f"one {torch.cuda.get_device_name()} ({os.cpu_count()} CPU cores)"
    return f"{os.cpu_count()}-core CPU"


def write_table(rows, settings, results: Path) -> None:
    gpu = settings["device"] == "cuda"
    machine = settings.get("machine", "2-core CPU")
    lines = [
        f"`asvd compress --param-ratio {settings['ratio']}` (whiten + fisher), device {settings['device']}, "
        f"SVD in {settings.get('svd_dtype', 'float64')}, factors stored as {settings.get('lowrank_form', 'pair')}, {machine}. "
        f"Random models: calibration {settings['calib_samples']}×{settings['seqlen']} random token windows; "
        "SmolLM2: 16×512 WikiText-2 validation windows. Each row is its own process.",
        "",
        "| model | params | fp32 size GiB | pipeline | peak RSS GiB | peak RSS / fp32 size | "
        + ("peak GPU GiB | " if gpu else "") + "wall s |",
        "|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for row in rows:
        head = f"| {row['label']} | {row['params'] / 1e9:.2f} B | {row['params'] * 4 / GIB:.2f} | {row['pipeline']} | "
        if "error" in row:
            reason = row["error"] if row["error"].startswith("stopped") else "failed"
            lines.append(head + f"{reason} | |" + (" |" if gpu else "") + " |")
            continue
        lines.append(head + f"{row['peak_rss_gib']:.2f} | {row['peak_rss_gib'] / row['fp32_gib']:.2f} | "
                     + (f"{row['peak_gpu_gib']:.2f} | " if gpu else "") + f"{row['seconds']:.0f} |")
    seq = {row["layers"]: row for row in rows if row.get("pipeline") == "sequential" and "1b-width" in row["label"] and "error" not in row}
    if 4 in seq and 16 in seq:
        size = seq[16]["fp32_gib"]
        lines += ["", f"Bars (1B width, sequential): 16-layer peak {seq[16]['peak_rss_gib']:.2f} GiB "
                  f"{'<' if seq[16]['peak_rss_gib'] < size / 2 else '≥'} half its fp32 size ({size / 2:.2f} GiB); "
                  f"16-layer − 4-layer peak = {seq[16]['peak_rss_gib'] - seq[4]['peak_rss_gib']:.2f} GiB "
                  f"{'<' if seq[16]['peak_rss_gib'] - seq[4]['peak_rss_gib'] < size / 4 else '≥'} a quarter of it ({size / 4:.2f} GiB)."]
    lines += ["", f"Made by: `python benchmarks/scale.py {settings['command']}`"]
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
