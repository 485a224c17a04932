"""Op census of SmolLM2's int4 decoder graphs: ours (torch.onnx), ours in the builder's graph, the builder's.

Reads the folders ``benchmarks/deploy.py --only quantized,builder --workdir W`` leaves in ``W`` and counts
the nodes of each graph by op type (the ops that make decode fast: GroupQueryAttention, the fused norms,
MatMulNBits; and the primitive ops that spell attention out).

    python benchmarks/op_census.py --workdir W     # writes benchmarks/results/op_census.md
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
GRAPHS = {  # column → folder under the deploy workdir
    "ours (torch.onnx), GPTQ int4/32": "onnx/dense_GPTQ-int4-b32",
    "ours, --graph builder, GPTQ int4/32": "onnx/dense_GPTQ-int4-b32-builder-graph",
    "builder int4/32": "builder/2-int4",
}
SHOWN = ("GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "MatMulNBits",
         "GatherBlockQuantized", "MatMul", "Mul", "Add", "Reshape", "Transpose", "Expand", "Concat", "Softmax",
         "Cos", "Sin", "Where")


def census(folder: Path) -> collections.Counter:
    import onnx

    return collections.Counter(node.op_type for node in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the workdir of a deploy.py run with the quantized and builder groups")
    args = parser.parse_args()
    counts = {label: census(Path(args.workdir) / folder) for label, folder in GRAPHS.items()}
    lines = ["# Op census: SmolLM2-135M int4 decoder graphs (`python benchmarks/op_census.py --workdir W`)", "",
             "| op | " + " | ".join(counts) + " |", "|---|" + "---|" * len(counts)]
    for op in SHOWN:
        lines.append(f"| {op} | " + " | ".join(str(c.get(op, 0)) for c in counts.values()) + " |")
    lines.append("| other | " + " | ".join(str(sum(v for k, v in c.items() if k not in SHOWN)) for c in counts.values()) + " |")
    lines.append("| **all nodes** | " + " | ".join(f"**{sum(c.values())}**" for c in counts.values()) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "op_census.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
