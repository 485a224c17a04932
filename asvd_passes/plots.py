"""Rank-per-layer plot written beside a compressed model (``ranks.png``)."""

from __future__ import annotations

import re
from pathlib import Path

_BLOCK = re.compile(r"^(.*?\.\d+)\.(.+)$")


def split_block(name: str) -> tuple[str, str]:
    """``model.layers.3.self_attn.q_proj`` → (``model.layers.3``, ``self_attn.q_proj``)."""
    match = _BLOCK.match(name)
    return (match.group(1), match.group(2)) if match else ("", name)


def plot_ranks(ranks: dict[str, int | None], max_ranks: dict[str, int], path: Path, title: str = "") -> Path:
    """Kept rank / max rank per decoder block, one line per projection kind (dense = 1.0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for name, rank in ranks.items():
        block, leaf = split_block(name)
        index = int(block.rsplit(".", 1)[-1]) if block else 0
        fraction = 1.0 if rank is None else rank / max_ranks[name]
        series.setdefault(leaf, []).append((index, fraction))
    figure, axis = plt.subplots(figsize=(9, 4.5))
    for leaf, points in sorted(series.items()):
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=leaf)
    axis.set_xlabel("decoder block")
    axis.set_ylabel("kept rank / min(in, out)  (1 = dense)")
    axis.set_ylim(0, 1.05)
    axis.set_title(title or "ASVD ranks per layer")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
