"""Peak memory in the report on every platform: ``resource`` is POSIX-only and ``ru_maxrss`` is bytes on macOS."""

from __future__ import annotations

import subprocess
import sys
import types

import asvd_passes.report as report


def fake_resource(maxrss: int) -> types.SimpleNamespace:
    usage = types.SimpleNamespace(ru_maxrss=maxrss)
    return types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: usage)


def test_linux_counts_maxrss_in_kilobytes(monkeypatch):
    monkeypatch.setattr(report.sys, "platform", "linux")
    monkeypatch.setattr(report, "resource", fake_resource(3 * 1024))
    assert report.peak_rss_mib() == 3.0


def test_macos_counts_maxrss_in_bytes(monkeypatch):
    monkeypatch.setattr(report.sys, "platform", "darwin")
    monkeypatch.setattr(report, "resource", fake_resource(3 * 2**20))
    assert report.peak_rss_mib() == 3.0


def test_without_resource_the_peak_working_set_is_read(monkeypatch):
    info = types.SimpleNamespace(peak_wset=5 * 2**20)  # Windows' field
    psutil = types.SimpleNamespace(Process=lambda: types.SimpleNamespace(memory_info=lambda: info))
    monkeypatch.setattr(report, "resource", None)
    monkeypatch.setitem(sys.modules, "psutil", psutil)
    assert report.peak_rss_mib() == 5.0


def test_package_imports_and_reports_without_the_resource_module():
    """What Windows sees: ``import resource`` fails; ``import asvd_passes`` and the peak figure still work."""
    code = ("import sys; sys.modules['resource'] = None\n"
            "import asvd_passes\n"
            "from asvd_passes.report import peak_rss_mib\n"
            "assert peak_rss_mib() >= 0.0\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
