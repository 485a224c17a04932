"""The heap setting that lets freed block-sized buffers leave the process (glibc only)."""

from __future__ import annotations

import sys

import pytest
import torch

from asvd_passes.pipelines.heap import map_large_allocations


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffers_between_live_ones_leave_the_process():
    """Interleaved 2 MiB buffers, every other one freed: with the threshold fixed below them they were
    mmapped, so freeing them returns their pages at once (from the heap, the live ones in between would
    pin them). 1 MiB stands for the default's 32 MiB, which would need gigabytes of buffers here."""
    if not map_large_allocations(1 << 20):
        pytest.skip("not glibc")
    big = torch.ones(4 << 20)  # 16 MiB, mmapped; freeing it would raise glibc's dynamic threshold past 2 MiB
    del big
    size = 2 << 20
    freed, kept = [], []
    for _ in range(32):
        freed.append(torch.ones(size // 4))  # touched, so resident
        kept.append(torch.ones(size // 4))
    before = _rss_bytes()
    freed.clear()
    after = _rss_bytes()
    del kept  # alive until here: the buffers between the freed ones
    assert before - after >= 0.9 * 32 * size, (before, after)
