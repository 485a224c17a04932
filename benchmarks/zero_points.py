"""Why block offsets are exported as a second MatMul and not as MatMulNBits' float zero points.

One 4-bit block-32 product y = x·Wᵀ (W: 1536 × 576, SmolLM2's MLP shape) in ONNX Runtime's CPU EP, one
intra-op thread, for the three ways to store a grid with a fractional zero point or without one:

- ``uint8 zero points``: MatMulNBits as ORT's quantizer writes it (integer zero points; no fractional grid);
- ``float zero points``: MatMulNBits with zero points of the activations' type (what HQQ writes);
- ``block offsets``: integer zero points + (x · P) · Cᵀ (P sums x over each block, C the offsets), our export.

Decode (1 row) and prefill (512 rows), accuracy levels 0 and 4, best of 5 runs of N calls, µs per call.

    python benchmarks/zero_points.py      # writes benchmarks/results/zero_points.{md,json}
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
N, K, BLOCK = 1536, 576, 32


def session(form: str, level: int, rng):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    blocks = K // BLOCK
    codes = rng.integers(0, 16, (N, K)).astype(np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(N, blocks, BLOCK // 2)
    scales = (rng.random((N, blocks)) * 0.01 + 0.001).astype(np.float32)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
    if form == "float zero points":
        inits.append(numpy_helper.from_array((rng.random((N, blocks)) * 15).astype(np.float32), "Z"))
    else:
        inits.append(numpy_helper.from_array(np.full((N, (blocks + 1) // 2), 0x88, np.uint8), "Z"))
    nbits_out = "y" if form != "block offsets" else "q"
    nodes = [helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], [nbits_out], domain="com.microsoft", K=K, N=N,
                              bits=4, block_size=BLOCK, accuracy_level=level)]
    if form == "block offsets":
        indicator = np.zeros((K, blocks), np.float32)
        indicator[np.arange(K), np.arange(K) // BLOCK] = 1
        inits += [numpy_helper.from_array(indicator, "P"),
                  numpy_helper.from_array(rng.standard_normal((blocks, N)).astype(np.float32) * 1e-3, "C")]
        nodes += [helper.make_node("MatMul", ["x", "P"], ["sums"]), helper.make_node("MatMul", ["sums", "C"], ["c"]),
                  helper.make_node("Add", ["q", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def time_call(runner, x: np.ndarray, calls: int) -> float:
    runner.run(None, {"x": x})
    best = float("inf")
    for _ in range(5):
        tick = time.perf_counter()
        for _ in range(calls):
            runner.run(None, {"x": x})
        best = min(best, (time.perf_counter() - tick) / calls * 1e6)
    return best


def main() -> None:
    import onnxruntime

    rng = np.random.default_rng(0)
    rows = []
    for level in (0, 4):
        for form in ("uint8 zero points", "float zero points", "block offsets"):
            runner = session(form, level, rng)
            row = {"form": form, "accuracy_level": level}
            for label, m, calls in (("decode_us", 1, 400), ("prefill_us", 512, 10)):
                row[label] = time_call(runner, rng.standard_normal((m, K)).astype(np.float32), calls)
            rows.append(row)
            print(row, flush=True)
    lines = [f"# MatMulNBits zero-point forms: one {N} × {K} int4 block-{BLOCK} product, ORT {onnxruntime.__version__} "
             "CPU EP, 1 thread (µs per call, best of 5)", "", "`python benchmarks/zero_points.py`", "",
             "| form | accuracy level | decode (1 row) µs | prefill (512 rows) µs |", "|---|---|---|---|"]
    lines += [f"| {r['form']} | {r['accuracy_level']} | {r['decode_us']:.1f} | {r['prefill_us']:.0f} |" for r in rows]
    (RESULTS / "zero_points.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "zero_points.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
