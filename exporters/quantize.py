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

Every ``MatMulNBits`` carries ``accuracy_level`` = :data:`CPU_ACCURACY_LEVEL` (4), what
onnxruntime-genai's model builder sets for the CPU EP: the activations are quantized to int8 per
block and the product runs on ORT's int8 kernels. Without it (level 0, fp32 compute) the CPU EP
dequantizes each weight block to float on every call: int8 weights decoded at a tenth of fp32's
speed (benchmarks/results/deploy.md). The cost is one more rounding, of the activations: logits
move by about 1e-2 of their range on tiny models (tests/exporters/test_quantize.py). The builder
sets 0 (no attribute) for the CUDA EP, whose kernels ignore it.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from asvd_passes.errors import InvalidInputError, MissingDependencyError

BLOCK_SIZES = (16, 32, 64, 128, 256)
WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")
QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized")
# MatMulNBits' accuracy_level: 4 = int8 activations and int8 compute (the builder's CPU default), 0 = unset.
CPU_ACCURACY_LEVEL = 4


def check_weights(weights: str, block_size: int | None) -> None:
    """Clear errors for an unknown weight format or block size, before any work."""
    if weights not in WEIGHT_FORMATS:
        raise InvalidInputError(f"--weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    if weights in ("int8", "int4") and block_size not in BLOCK_SIZES:
        raise InvalidInputError(
            f"--block-size {block_size} is not supported by MatMulNBits for {weights}: use one of "
            f"{', '.join(map(str, BLOCK_SIZES))} (a power of two, at least 16)"
        )


def check_quantizable(model, weights: str) -> None:
    """Refuse an int4 export of a model that holds interpolative-form low-rank projections.

    Its ``up`` holds interpolation coefficients over r skeleton outputs that are large and strongly
    correlated, so per-block round-to-nearest errors in either factor are amplified instead of
    averaging out: SmolLM2 at --param-ratio 0.9 --kv-ratio 0.5, every weight fake-quantized to 4 bits
    (asymmetric, block 64) in PyTorch, went from perplexity 49.5 to 32,482 (the same model in pairs:
    50.6 to 72.5); 8 bits and bf16 stay within 0.5, and GPTQ only reaches 782
    (research/int4_form_screen.py). MatMulNBits cannot keep it.
    """
    from asvd_passes.modules import LowRankLinear

    if weights != "int4":
        return
    interpolative = [name for name, module in model.named_modules()
                     if isinstance(module, LowRankLinear) and module.interpolative]
    if interpolative:
        raise InvalidInputError(
            f"--weights int4 would destroy this model: {len(interpolative)} projections (e.g. {interpolative[0]}) are "
            "stored in the interpolative low-rank form, whose coefficients amplify 4-bit rounding errors (measured on "
            "SmolLM2: perplexity 49.5 -> 32,482). Export it with --weights int8, fp16 or fp32, or compress with "
            "--lowrank-form pair for an int4 export"
        )


def quantize_onnx(path: str | Path, bits: int, block_size: int, external_data: bool = False,
                  accuracy_level: int = CPU_ACCURACY_LEVEL, grids: dict | None = None) -> dict:
    """Quantize ``path`` in place; return what became N-bit and what stayed float (op counts, bytes).

    ``grids`` ({module name: :class:`~asvd_passes.quantization.BlockQuantized`}, from a folder that
    ``asvd quantize`` wrote): the MatMuls whose weights they hold are written as MatMulNBits from those
    codes, scales and zero points as they are (each at its own bits and block size); ORT's quantizer
    rounds the rest (the embedding, anything unrecorded) as without them.
    """
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
        raise MissingDependencyError(
            f"int{bits} export needs ONNX Runtime's quantizer and the 'onnx-ir' package: pip install onnx-ir ({err})"
        ) from err
    finally:  # its module calls logging.basicConfig(level=INFO) on import: give the root logger back
        root.handlers[:], root.level = handlers, root_level

    path = Path(path)
    model = onnx.load(str(path))
    untied = untie_transposed_weights(model)
    recorded, table_shared = write_recorded_grids(model, grids, accuracy_level) if grids else (0, False)
    op_types = ("MatMul", "Gather") if bits == 4 else ("MatMul",)  # GatherBlockQuantized is 4-bit only
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=bits,
                                          accuracy_level=accuracy_level, op_types_to_quantize=op_types)
    offset_nodes = [node.name for node in model.graph.node if is_block_offset_matmul(node)]  # exact float, by design
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=False,
                                     accuracy_level=accuracy_level, nodes_to_exclude=offset_nodes,
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
    shared = table_shared or (share_tied_embedding(quantized, untied) if bits == 4 else False)
    for stale in path.parent.glob(path.name + ".data"):
        stale.unlink()
    onnx.save(quantized, str(path), save_as_external_data=external_data,
              location=path.name + ".data" if external_data else None)
    return {**weight_summary(quantized), "tied_embedding_shared": shared, "from_recorded_grids": recorded,
            "accuracy_level": accuracy_level}


def value_key(array: np.ndarray) -> tuple:
    """What identifies a weight by value: its shape and a digest of its bytes (matrices are found by value
    because the export names initializers its own way)."""
    import hashlib

    return array.shape, hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).digest()


def write_recorded_grids(model, grids: dict, accuracy_level: int = CPU_ACCURACY_LEVEL) -> tuple[int, bool]:
    """Replace each MatMul whose weight is a recorded grid's dequantized matrix by MatMulNBits with its codes.

    Weights are found by value (the export names initializers its own way): a recorded weight W lies
    exactly on its grid, and the MatMul reads Wᵀ bit for bit. Tensors are named as ORT's quantizer
    names them (``<weight>_Q4`` …). An embedding tied to a recorded head reads the head's 4-bit
    tensors. Returns (matrices written, whether an embedding shares them).
    """
    from onnx import helper, numpy_helper

    from asvd_passes.quantization import packed

    by_value = {value_key(q.dequantize().T.numpy()): q for q in grids.values()}
    initializers = {init.name: init for init in model.graph.initializer}
    replaced, stems = set(), {}
    for node in list(model.graph.node):
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        init = initializers[node.input[1]]
        if init.data_type != 1 or len(init.dims) != 2:
            continue
        q = by_value.get(value_key(numpy_helper.to_array(init)))
        if q is None:
            continue
        weight = stems.setdefault(id(q), node.input[1])
        names = [f"{weight}_Q{q.bits}", f"{weight}_scales", f"{weight}_zero_points"]
        for name, array in zip(names, packed(q)):
            if name not in initializers:
                initializers[name] = numpy_helper.from_array(array, name)
                model.graph.initializer.append(initializers[name])
        n, k = q.shape
        outputs = list(node.output) if q.offsets is None else [f"{node.output[0]}_nbits"]
        written = [helper.make_node("MatMulNBits", [node.input[0], *names], outputs,
                                    name=f"{node.name}_Q{q.bits}", domain="com.microsoft",
                                    K=k, N=n, bits=q.bits, block_size=q.block_size,
                                    accuracy_level=accuracy_level)]
        if q.offsets is not None:
            written += _block_offset_nodes(node, q, outputs[0], weight, initializers, model)
        index = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for position, new in enumerate(written):
            model.graph.node.insert(index + position, new)
        replaced.add(node.input[1])
    tables = _gather_from_recorded_grids(model, grids, initializers, stems)
    replaced |= tables
    readers = {i for node in model.graph.node for i in node.input}
    for name in replaced - readers:
        model.graph.initializer.remove(initializers.pop(name))
    if replaced and not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(stems), bool(tables)


OFFSETS_SUFFIX, INDICATOR_SUFFIX = "_block_offsets", "_block_indicator"


def is_block_offset_matmul(node) -> bool:
    """One of the small float MatMuls :func:`_block_offset_nodes` writes beside a MatMulNBits."""
    return node.op_type == "MatMul" and node.input[1].endswith((OFFSETS_SUFFIX, INDICATOR_SUFFIX))


def _block_offset_nodes(node, q, nbits_output: str, weight: str, initializers: dict, model) -> list:
    """y = MatMulNBits(x) + (x · P) · Cᵀ: P (K × blocks) sums x over each block, C (N × blocks) holds the block
    offsets. P is one initializer per (K, block size), and x · P one node per input, shared by every matrix
    that reads the same x (q/k/v, gate/up)."""
    from onnx import helper, numpy_helper

    n, k = q.shape
    blocks = q.offsets.shape[1]
    indicator = f"asvd_K{k}_B{q.block_size}{INDICATOR_SUFFIX}"
    nodes = []
    if indicator not in initializers:
        table = np.zeros((k, blocks), np.float32)
        table[np.arange(k), np.arange(k) // q.block_size] = 1.0
        initializers[indicator] = numpy_helper.from_array(table, indicator)
        model.graph.initializer.append(initializers[indicator])
    sums = f"{node.input[0]}{indicator}_sums"
    if not any(sums in n_.output for n_ in model.graph.node):
        nodes.append(helper.make_node("MatMul", [node.input[0], indicator], [sums], name=sums))
    offsets = f"{weight}{OFFSETS_SUFFIX}"
    if offsets not in initializers:
        initializers[offsets] = numpy_helper.from_array(np.ascontiguousarray(q.offsets.float().T.numpy()), offsets)
        model.graph.initializer.append(initializers[offsets])
    shift = f"{node.output[0]}{OFFSETS_SUFFIX}"
    nodes.append(helper.make_node("MatMul", [sums, offsets], [shift], name=shift))
    nodes.append(helper.make_node("Add", [nbits_output, shift], list(node.output), name=f"{node.name}_add_offsets"))
    return nodes


def _gather_from_recorded_grids(model, grids: dict, initializers: dict, stems: dict) -> set[str]:
    """An embedding table that is a recorded 4-bit grid's weight (a head tied to it) → ``GatherBlockQuantized``
    reading that grid's MatMulNBits tensors through ``Reshape``: one 4-bit table in the file, as in the
    float model. Returns the float tables it replaced."""
    from onnx import helper, numpy_helper

    tables = {value_key(q.dequantize().numpy()): q for q in grids.values()
              if q.bits == 4 and q.shape[1] % q.block_size == 0}
    replaced = set()
    for node in list(model.graph.node):
        if node.op_type != "Gather" or node.input[0] not in initializers:
            continue
        init = initializers[node.input[0]]
        if init.data_type != 1 or len(init.dims) != 2 or helper.get_attribute_value(
                next((a for a in node.attribute if a.name == "axis"), helper.make_attribute("axis", 0))) != 0:
            continue
        q = tables.get(value_key(numpy_helper.to_array(init)))
        if q is None or id(q) not in stems:  # the head's MatMulNBits tensors are the ones to share
            continue
        stem = stems[id(q)]
        source = f"{stem}_Q4"
        n, k = q.shape
        inputs = []
        for tensor, shape in ((source, (n, -1)), (f"{stem}_scales", (n, k // q.block_size)),
                              (f"{stem}_zero_points", (n, -1))):
            name = f"{node.name or node.output[0]}.{tensor}"
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(shape, "int64"), name + ".shape"))
            model.graph.node.insert(0, helper.make_node("Reshape", [tensor, name + ".shape"], [name], name=name))
            inputs.append(name)
        gather = helper.make_node("GatherBlockQuantized", [inputs[0], node.input[1], inputs[1], inputs[2]],
                                  list(node.output), name=f"{node.name}_Q4", domain="com.microsoft",
                                  bits=4, block_size=q.block_size, gather_axis=0, quantize_axis=1)
        index = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(index, gather)
        replaced.add(node.input[0])
    return replaced


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


def share_tied_embedding(model, untied: dict[str, str]) -> bool:
    """Let a 4-bit embedding read the 4-bit tensors of the LM head untied from it.

    The untied head's weight is the embedding table transposed, quantized by ``MatMulNBits`` in
    blocks along K = hidden: the same blocks as the embedding's own ``GatherBlockQuantized`` copy
    (blocks along its hidden axis). ORT's two code paths round a few codes and zero points
    differently (SmolLM2, block 64: 0.08% of codes, 0.003% of zero points, never by more than one
    step), so the copies are checked to dequantize within one quantization step of each other;
    then the gather reads the head's packed uint8 tensors (``bits=4``) through ``Reshape`` and its
    own copy is dropped: one table in the file, as in the dense model. A hidden size that the block
    size does not divide (padded blocks in the head) keeps both copies.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    attributes = lambda node: {a.name: helper.get_attribute_value(a) for a in node.attribute}  # noqa: E731
    unpack = lambda a: np.stack([a & 15, a >> 4], -1).reshape(a.shape[0], -1).astype(np.float32)  # noqa: E731
    heads = {node.input[1]: node for node in model.graph.node if node.op_type == "MatMulNBits" and len(node.input) >= 4}
    shared = False
    for gather in [n for n in model.graph.node if n.op_type == "GatherBlockQuantized" and len(n.input) >= 4]:
        source = next((src for t, src in untied.items() if gather.input[0] == f"{src}_Q4" and f"{t}_Q4" in heads), None)
        if source is None:
            continue
        head = heads[f"{next(t for t, src in untied.items() if src == source)}_Q4"]
        g, h = attributes(gather), attributes(head)
        codes, scales, zeros = (numpy_helper.to_array(initializers[gather.input[i]]).astype(np.float32) for i in (0, 2, 3))
        block = g["block_size"]
        if (g.get("quantize_axis"), g.get("gather_axis", 0), h["bits"], h["block_size"], h["N"], h["K"]) != (
                1, 0, 4, block, *codes.shape) or h["K"] % block:
            continue
        blocks = h["K"] // block
        head_codes, head_scales, head_zeros = (numpy_helper.to_array(initializers[head.input[i]]) for i in (1, 2, 3))
        head_scales = head_scales.reshape(h["N"], blocks)
        head_zeros = unpack(head_zeros.reshape(h["N"], -1))[:, :blocks]
        own = (codes.reshape(h["N"], blocks, block) - zeros[..., None]) * scales[..., None]
        theirs = (unpack(head_codes).reshape(h["N"], blocks, block) - head_zeros[..., None]) * head_scales[..., None]
        if np.any(np.abs(own - theirs) > 1.001 * np.maximum(scales, head_scales)[..., None]):
            continue
        for position, (tensor, shape) in enumerate(
            ((head.input[1], (h["N"], -1)), (head.input[2], (h["N"], blocks)), (head.input[3], (h["N"], -1)))
        ):
            name = f"{gather.name}.shared_input_{position}"
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(shape, "int64"), name + ".shape"))
            model.graph.node.insert(0, helper.make_node("Reshape", [tensor, name + ".shape"], [name], name=name))
            slot = (0, 2, 3)[position]
            model.graph.initializer.remove(initializers.pop(gather.input[slot]))
            gather.input[slot] = name
        gather.attribute.append(helper.make_attribute("bits", 4))
        shared = True
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
    offset_matmuls = 0
    for node in model.graph.node:
        if is_block_offset_matmul(node):
            offset_matmuls += 1
            continue
        if node.op_type == "MatMul" and is_constant(node.input[1]):
            weight = node.input[1]
            source = "initializer" if weight in initializers else f"{producers[weight].op_type} of initializers"
            float_matmuls.append({"node": node.name, "weight": weight, "from": source})
        elif node.op_type not in (*QUANTIZED_OPS, "MatMul", "Gather", "Reshape") and any(map(is_float_matrix, node.input)):
            float_others.append({"node": node.name, "op": node.op_type})
        elif node.op_type == "Gather" and node.input[0] in initializers and len(initializers[node.input[0]].dims) == 2:
            float_gathers.append(node.name)
    quantized_bytes = sum(nbytes(name) for node in model.graph.node if node.op_type in QUANTIZED_OPS
                          for name in node.input[1:])
    quantized_bytes += sum(nbytes(name) for name in initializers if name.endswith(OFFSETS_SUFFIX))
    total_bytes = sum(nbytes(name) for name in initializers)
    return {
        "ops": {op: ops[op] for op in (*QUANTIZED_OPS, "MatMul", "Gather") if ops[op]},
        # MatMulNBits with block offsets add (x · P) · Cᵀ: those small MatMuls (see _block_offset_nodes).
        "block_offset_matmuls": offset_matmuls,
        "quantized_bytes": quantized_bytes,
        "float_bytes": total_bytes - quantized_bytes,
        # MatMuls that still read a weight (not two activations): left float because the weight is not
        # a constant 2-D initializer (computed from one at run time: e.g. stacked per-group ups).
        "float_weight_matmuls": float_matmuls,
        "float_embedding_gathers": float_gathers,
        # Other ops reading a float matrix (e.g. an Einsum by a per-head 3-D V up): no N-bit kernel for them.
        "float_weight_nodes": float_others,
    }
