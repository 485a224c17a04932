"""Where the peak RSS of a sequential compression happens: RSS sampled every 0.1 s with the code location.

Compresses a random-weight Llama-shaped checkpoint (``benchmarks/scale.py``'s bf16 shards) with the
sequential pipeline on the CPU, and prints the highest samples, one per distinct call site, with the
innermost frames of the main thread at that moment. For memory work only (random weights).

    python benchmarks/rss_profile.py --shape 1b-width --layers 2
    python benchmarks/rss_profile.py --shape 1b-width --layers 4 --high-water

``--high-water`` reads the kernel's exact peak (VmHWM) at the entry and exit of the pipeline's main
steps instead, and prints every interval in which the peak rose: a short allocation that 0.1 s
sampling misses still shows there.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _status_gib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now; VmHWM: the kernel's peak so far), in GiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def rss_gib() -> float:
    return _status_gib("VmRSS")


def high_water_gib() -> float:
    return _status_gib("VmHWM")


def watch_high_water(log: list) -> None:
    """Wrap the pipeline's steps so that every rise of VmHWM is attributed to the interval it happened in."""
    import functools

    from asvd_passes import decompose, scaling
    from asvd_passes.pipelines import sequential, weights

    last = {"label": "start", "value": high_water_gib()}

    def checkpoint(label):
        value = high_water_gib()
        if value > last["value"] + 1e-3:
            log.append((value, value - last["value"], f"{last['label']} -> {label}"))
        last.update(label=label, value=value)

    def wrap(owner, name):
        original = getattr(owner, name)
        raw = original.__func__ if isinstance(original, classmethod) else original

        @functools.wraps(raw)
        def wrapper(*args, **kwargs):
            checkpoint(f"enter {name}")
            try:
                return raw(*args, **kwargs)
            finally:
                checkpoint(f"exit {name}")

        setattr(owner, name, classmethod(wrapper) if isinstance(original, classmethod) else wrapper)

    pipeline = sequential.SequentialPipeline
    for name in ("_observe", "_block_fisher", "_head_gradients", "_release", "_kv_svds"):
        wrap(pipeline, name)
    wrap(decompose.ScaledSVD, "of")
    wrap(decompose.ScaledSVD, "factors")
    wrap(scaling, "whitening_scaling")
    wrap(sequential, "loss_cost_curve")
    wrap(sequential.LowRankLinear, "from_factors")
    wrap(sequential.LowRankRewritePass, "call")
    wrap(sequential, "run_block")
    for cls in (weights.ShardedWeights, weights.ResidentWeights):
        for name in ("load", "release", "release_rest"):
            if hasattr(cls, name):
                wrap(cls, name)
    wrap(sequential, "shared_scalings")
    wrap(weights.ShardWriter, "write")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1b-width")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/asvd-scale")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--high-water", action="store_true", help="attribute every rise of VmHWM to a pipeline step")
    args = parser.parse_args()

    import torch

    from asvd_passes import ASVDCompressor, ASVDConfig
    from scale import write_random_llama

    folder = Path(args.workdir) / "models" / f"{args.shape}-{args.layers}"
    write_random_llama(folder, args.shape, args.layers)
    main_thread, samples = threading.get_ident(), []

    def sample():
        while True:
            frame = sys._current_frames().get(main_thread)
            stack = [f"{f.name}:{f.lineno}" for f in traceback.extract_stack(frame)[-6:]] if frame else []
            samples.append((rss_gib(), stack))
            time.sleep(0.1)

    rises: list = []
    if args.high_water:
        watch_high_water(rises)
    else:
        threading.Thread(target=sample, daemon=True).start()
    compressor = ASVDCompressor.from_pretrained(str(folder))
    windows = torch.randint(3, 32000, (4, 512), generator=torch.Generator().manual_seed(0))
    out = Path(tempfile.mkdtemp(prefix="asvd-rss-")) / "out"
    try:
        compressor.compress(ASVDConfig(param_ratio=args.ratio, pipeline="sequential", device="cpu", calib_samples=4,
                                       seqlen=512, seed=0, lowrank_form="pair"), calibration=windows, save_dir=out, progress=False)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    if args.high_water:
        print(f"{args.shape}, {args.layers} layers, param ratio {args.ratio}: peak RSS (VmHWM) {high_water_gib():.3f} GiB")
        for value, rise, interval in sorted(rises, key=lambda r: -r[0])[: args.top]:
            print(f"{value:.3f} GiB (+{rise * 1024:.0f} MiB)  {interval}")
        return 0
    print(f"{args.shape}, {args.layers} layers, param ratio {args.ratio}: peak sampled RSS {max(s[0] for s in samples):.2f} GiB")
    seen = set()
    for value, stack in sorted(samples, key=lambda s: -s[0]):
        site = " > ".join(stack[-3:])
        if site in seen:
            continue
        seen.add(site)
        print(f"{value:.2f} GiB  {' > '.join(stack)}")
        if len(seen) >= args.top:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
