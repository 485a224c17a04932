"""Weight-only quantization of an exported ONNX model with ONNX Runtime's own quantizer.

``MatMulNBitsQuantizer`` (``onnxruntime.quantization.matmul_nbits_quantizer``; it needs the
``onnx-ir`` package) rewrites every ``MatMul`` whose weight is a constant 2-D initializer into
``com.microsoft.MatMulNBits`` (4 or 8 bits, one scale and zero point per ``block_size`` inputs),
and, asked with ``op_types_to_quantize=("MatMul", "Gather")``, the embedding ``Gather`` into
``GatherBlockQuantized`` (4 bits only: at 8 bits ORT's quantizer leaves the embedding in float).
That covers the dense projections, both thin ASVD factors (``down`` and ``up``), the latent K/V
``down``/``up`` (the export writes V's folded ``up`` as a 2-D MatMul for this) and the LM head (a
tied one is untied first, then shares its 4-bit tensors with the embedding). What it cannot touch
stays float and is reported (``weight_summary``): norm scales, biases, RoPE tables, and any op that
reads a float matrix without an N-bit kernel.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

BLOCK_SIZES = (16, 32, 64, 128, 256)
WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")
QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized")


def check_weights(weights: str, block_size: int | None) -> None:
    """Clear errors for an unknown weight format or block size, before any work."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    if weights in ("int8", "int4") and block_size not in BLOCK_SIZES:
        raise ValueError(
            f"--block-size {block_size} is not supported by MatMulNBits for {weights}: use one of "
            f"{', '.join(map(str, BLOCK_SIZES))} (a power of two, at least 16)"
        )


def quantize_onnx(path: str | Path, bits: int, block_size: int, external_data: bool = False) -> dict:
    """Quantize ``path`` in place; return what became N-bit and what stayed float (op counts, bytes)."""
    import onnx

    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    try:
        import onnx_ir  # noqa: F401  (MatMulNBitsQuantizer imports it lazily and fails late without it)
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )
    except ImportError as err:
        raise ImportError(
            f"int{bits} export needs ONNX Runtime's quantizer and the 'onnx-ir' package: pip install onnx-ir ({err})"
        ) from err
    finally:  # its module calls logging.basicConfig(level=INFO) on import: give the root logger back
        root.handlers[:], root.level = handlers, root_level

    path = Path(path)
    model = onnx.load(str(path))
    untie_transposed_weights(model)
    op_types = ("MatMul", "Gather") if bits == 4 else ("MatMul",)  # GatherBlockQuantized is 4-bit only
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=bits,
                                          op_types_to_quantize=op_types)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=False,
                                     op_types_to_quantize=op_types, algo_config=config)
    # The quantizer logs one INFO line per node it skips, onnx-ir one per deduplicated initializer.
    loggers = [logging.getLogger(name) for name in (MatMulNBitsQuantizer.__module__, "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    quantized = quantizer.model.model
    shared = share_tied_embedding(quantized) if bits == 4 else False
    for stale in path.parent.glob(path.name + ".data"):
        stale.unlink()
    onnx.save(quantized, str(path), save_as_external_data=external_data,
              location=path.name + ".data" if external_data else None)
    return {**weight_summary(quantized), "tied_embedding_shared": shared}


def untie_transposed_weights(model) -> dict[str, str]:
    """``MatMul(x, Transpose(W))`` → ``MatMul(x, Wᵀ)`` with Wᵀ a new initializer; returns {Wᵀ name: W name}.

    A tied LM head exports as the embedding table transposed at run time, which the quantizer does
    not touch (its weight is no initializer). Stored transposed, it is quantized like any projection.
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    transposes = {node.output[0]: node for node in model.graph.node
                  if node.op_type == "Transpose" and node.input[0] in initializers
                  and len(initializers[node.input[0]].dims) == 2}
    untied = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in transposes:
            source = transposes[node.input[1]].input[0]
            name = f"{source}.transposed"
            if name not in untied:
                array = numpy_helper.to_array(initializers[source]).T.copy()
                model.graph.initializer.append(numpy_helper.from_array(array, name))
                untied[name] = source
            node.input[1] = name
    readers = {i for node in model.graph.node for i in node.input}
    for output, node in transposes.items():
        if output not in readers:
            model.graph.node.remove(node)
    return untied


def share_tied_embedding(model) -> bool:
    """Let a 4-bit embedding read the 4-bit LM head's tensors when they quantize the same table.

    The embedding quantized by rows (``GatherBlockQuantized``, blocks along the hidden axis) and its
    transpose quantized as the LM head (``MatMulNBits``, blocks along K = hidden) hold the same
    blocks. When their scales and zero points are equal and their codes differ by at most one step
    (ORT's two quantizer code paths round a few values differently: 0.3% of SmolLM2's codes), the
    gather reads the head's packed uint8 tensors (``bits=4``) through ``Reshape`` and its own copy is
    dropped: one table in the file, as in the dense model. Otherwise both copies stay.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    attributes = lambda node: {a.name: helper.get_attribute_value(a) for a in node.attribute}  # noqa: E731
    unpack = lambda a: np.stack([a & 15, a >> 4], -1).reshape(a.shape[0], -1).astype(np.int16)  # noqa: E731
    shared = False
    for gather in [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]:
        g = attributes(gather)
        if len(gather.input) < 4 or g.get("quantize_axis") != 1 or g.get("gather_axis", 0) != 0:
            continue
        codes, scales, zeros = (numpy_helper.to_array(initializers[gather.input[i]]) for i in (0, 2, 3))
        for head in [n for n in model.graph.node if n.op_type == "MatMulNBits" and len(n.input) >= 4]:
            h = attributes(head)
            if (h["bits"], h["block_size"], h["N"], h["K"]) != (4, g["block_size"], *codes.shape):
                continue
            head_codes, head_scales, head_zeros = (numpy_helper.to_array(initializers[head.input[i]]) for i in (1, 2, 3))
            blocks = head_scales.size // h["N"]
            same_grid = (np.array_equal(head_scales.reshape(scales.shape), scales)
                         and np.array_equal(unpack(head_zeros.reshape(h["N"], -1))[:, :blocks], zeros.astype(np.int16)))
            if not same_grid or np.abs(unpack(head_codes)[:, : h["K"]] - codes.astype(np.int16)).max() > 1:
                continue
            for position, (source, shape) in enumerate(
                ((head.input[1], (h["N"], -1)), (head.input[2], (h["N"], blocks)), (head.input[3], (h["N"], -1)))
            ):
                name = f"{gather.name}.shared_input_{position}"
                model.graph.initializer.append(numpy_helper.from_array(np.asarray(shape, "int64"), name + ".shape"))
                model.graph.node.insert(0, helper.make_node("Reshape", [source, name + ".shape"], [name], name=name))
                slot = (0, 2, 3)[position]
                if gather.input[slot] in initializers:
                    model.graph.initializer.remove(initializers.pop(gather.input[slot]))
                gather.input[slot] = name
            gather.attribute.append(helper.make_attribute("bits", 4))
            shared = True
            break
    return shared


def weight_summary(model) -> dict:
    """Op counts and initializer bytes of a model: N-bit ops, and float weights that stayed float (with why)."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    ops = Counter(node.op_type for node in model.graph.node)

    def nbytes(name: str) -> int:
        return numpy_helper.to_array(initializers[name]).nbytes if name in initializers else 0

    constant: dict[str, bool] = {}

    def is_constant(name: str) -> bool:  # an initializer, or computed from initializers only
        if name not in constant:
            node = producers.get(name)
            constant[name] = name in initializers or (
                node is not None and all(is_constant(i) for i in node.input if i))
        return constant[name]

    def is_float_matrix(name: str) -> bool:
        init = initializers.get(name)
        return init is not None and len(init.dims) >= 2 and init.data_type in (1, 10, 16)  # float, fp16, bf16

    float_matmuls, float_gathers, float_others = [], [], []
    for node in model.graph.node:
        if node.op_type == "MatMul" and is_constant(node.input[1]):
            weight = node.input[1]
            source = "initializer" if weight in initializers else f"{producers[weight].op_type} of initializers"
            float_matmuls.append({"node": node.name, "weight": weight, "from": source})
        elif node.op_type not in (*QUANTIZED_OPS, "MatMul", "Gather") and any(map(is_float_matrix, node.input)):
            float_others.append({"node": node.name, "op": node.op_type})
        elif node.op_type == "Gather" and node.input[0] in initializers and len(initializers[node.input[0]].dims) == 2:
            float_gathers.append(node.name)
    quantized_bytes = sum(nbytes(name) for node in model.graph.node if node.op_type in QUANTIZED_OPS
                          for name in node.input[1:])
    total_bytes = sum(nbytes(name) for name in initializers)
    return {
        "ops": {op: ops[op] for op in (*QUANTIZED_OPS, "MatMul", "Gather") if ops[op]},
        "quantized_bytes": quantized_bytes,
        "float_bytes": total_bytes - quantized_bytes,
        # MatMuls that still read a weight (not two activations): left float because the weight is not
        # a constant 2-D initializer (computed from one at run time: e.g. stacked per-group ups).
        "float_weight_matmuls": float_matmuls,
        "float_embedding_gathers": float_gathers,
        # Other ops reading a float matrix (e.g. an Einsum by a per-head 3-D V up): no N-bit kernel for them.
        "float_weight_nodes": float_others,
    }
