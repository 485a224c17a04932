"""Where the peak RSS of a sequential compression happens: RSS sampled every 0.1 s with the code location.

Compresses a random-weight Llama-shaped checkpoint (``benchmarks/scale.py``'s bf16 shards) with the
sequential pipeline on the CPU, and prints the highest samples, one per distinct call site, with the
innermost frames of the main thread at that moment. For memory work only (random weights).

    python benchmarks/rss_profile.py --shape 1b-width --layers 2
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


def rss_gib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1b-width")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/asvd-scale")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--top", type=int, default=12)
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

    threading.Thread(target=sample, daemon=True).start()
    compressor = ASVDCompressor.from_pretrained(str(folder))
    windows = torch.randint(3, 32000, (4, 512), generator=torch.Generator().manual_seed(0))
    out = Path(tempfile.mkdtemp(prefix="asvd-rss-")) / "out"
    try:
        compressor.compress(ASVDConfig(param_ratio=args.ratio, pipeline="sequential", device="cpu", calib_samples=4,
                                       seqlen=512, seed=0), calibration=windows, save_dir=out, progress=False)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
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
