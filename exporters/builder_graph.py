"""Our models in onnxruntime-genai's model builder's decoder graph (``--graph builder``).

The builder writes a decoder with ONNX Runtime's fused kernels: ``GroupQueryAttention`` (rotary inside),
``SkipSimplifiedLayerNormalization``, ``MatMulNBits``. Our own export (torch.onnx, dynamo) spells attention,
RoPE and the norms out in primitive ops and decodes at 0.68x / 0.82x the builder's int4 (128 / 2048 tokens
of context). Where our compression changes only the weights (a dense or low-rank model in float, GPTQ codes,
a byte-budget plan, block offsets), nothing in the graph needs to be ours:

1. the builder builds its fp32 graph from the folder (the float weights are exactly on their grids); a low-rank
   model is first written as a plain checkpoint with each projection's dense product (:func:`write_dense_folder`);
2. the graph is checked against transformers' logits (a configuration the builder reads differently is refused):
   a quantized export's before our weights go in, a float export's as written (builder and rewrite together);
3. each MatMul is found by value: a MatMul the builder packed (q/k/v into one ``qkv_proj``) is split into one
   MatMul per matrix where one of them is written its own way; a low-rank projection becomes its two thin MatMuls
   (:func:`low_rank_matmuls`); each recorded grid (:func:`exporters.quantize.write_recorded_grids`) becomes
   MatMulNBits from its codes, packed again where q/k/v share a grid (the builder's single kernel call); the
   embedding, which the builder gathers from the tied head's transposed weight, is gathered from the head's
   4-bit tensors;
4. the rotary cos/sin tables the builder stores (2 MiB on SmolLM2) become nodes computing them, so the file
   is the size a byte budget planned for our graph (:func:`rotary_tables_in_graph`);
5. a quantized export with a weight left in float is an error (the builder changed it, so the grids could not
   be kept).

A latent KV cache has no form in the builder's graph (its attention reads a dense cache): those models keep
our export.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from asvd_passes.errors import InvalidInputError, MissingDependencyError

BUILDER_MODULE = "onnxruntime_genai.models.builder"


def run_builder(folder: Path, out: Path, progress: bool) -> None:
    """``python -m onnxruntime_genai.models.builder -i FOLDER -o OUT -p fp32 -e cpu`` in its own process; a graph
    with window-sized caches (sliding-window layers, which our runner feeds no buffer for) is refused."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(f"--graph builder needs onnxruntime-genai: pip install onnxruntime-genai ({err})") from err
    command = [sys.executable, "-m", BUILDER_MODULE, "-i", str(folder), "-o", str(out), "-p", "fp32", "-e", "cpu",
               "-c", str(out.parent / "builder-cache")]
    result = subprocess.run(command, capture_output=not progress, text=True)
    if result.returncode != 0 or not (out / "model.onnx").is_file():
        last = ((result.stderr or "").strip().splitlines() or ["(no message)"])[-1] if not progress else "(its output is above)"
        raise InvalidInputError(f"onnxruntime-genai's model builder could not build {folder}: {last}; "
                                "export without --graph builder")
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    if decoder.get("sliding_window"):
        raise InvalidInputError(
            "the builder's graph of this model keeps window-sized caches for its sliding-window layers, which "
            "our ONNX Runtime runner does not feed: export without --graph builder")


def split_packed_matmuls(model, matrices: dict, needed: set) -> int:
    """A MatMul whose weight columns are several of ``matrices`` ({name: out × in array}) side by side (the
    builder's packed q/k/v) becomes one MatMul per matrix and a Concat of their outputs, where one of them is in
    ``needed`` (a recorded grid or a low-rank projection: written its own way). Returns how many were split."""
    from onnx import helper, numpy_helper

    from .quantize import value_key

    transposed = {value_key(np.ascontiguousarray(w.T)): name for name, w in matrices.items()}
    widths = sorted({w.shape[0] for w in matrices.values()}, reverse=True)
    initializers = {init.name: init for init in model.graph.initializer}
    split = 0
    for node in list(model.graph.node):
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if weight.ndim != 2 or value_key(weight) in transposed:
            continue
        parts, start = [], 0
        while start < weight.shape[1]:
            width = next((w for w in widths if start + w <= weight.shape[1]
                          and value_key(weight[:, start:start + w]) in transposed), None)
            if width is None:
                break
            parts.append((start, width, transposed[value_key(weight[:, start:start + width])]))
            start += width
        if start != weight.shape[1] or len(parts) < 2 or not any(name in needed for *_, name in parts):
            continue
        new, outputs = [], []
        for index, (begin, width, _) in enumerate(parts):
            name = f"{node.input[1]}.part{index}"
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight[:, begin:begin + width]), name))
            outputs.append(f"{node.output[0]}.part{index}")
            new.append(helper.make_node("MatMul", [node.input[0], name], [outputs[-1]], name=f"{node.name}.part{index}"))
        new.append(helper.make_node("Concat", outputs, list(node.output), name=f"{node.name}.concat", axis=-1))
        position = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for offset, item in enumerate(new):
            model.graph.node.insert(position + offset, item)
        model.graph.initializer.remove(initializers.pop(node.input[1]))
        split += 1
    return split


def low_rank_matmuls(model, factored: dict) -> int:
    """Each MatMul whose weight is a low-rank projection's matrix (found by value; ``factored``: {name:
    (its out × in matrix as the builder read it, the ``LowRankLinear``)}) becomes the projection's two thin
    MatMuls, x·Dᵀ then ·Uᵀ; the interpolative form then puts its r kept rows and the rest back in order
    (Concat, Gather). A bias stays the builder's Add after them. Returns how many were written."""
    from onnx import helper, numpy_helper

    from .quantize import value_key

    by_value = {value_key(np.ascontiguousarray(w.T)): module for w, module in factored.values()}
    initializers = {init.name: init for init in model.graph.initializer}
    written = 0
    for node in list(model.graph.node):
        init = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if init is None or len(init.dims) != 2:
            continue
        module = by_value.get(value_key(numpy_helper.to_array(init)))
        if module is None:
            continue
        stem, output = node.input[1], node.output[0]
        tensors = {f"{stem}.down": module.down.weight, f"{stem}.up": module.up.weight}
        for name, weight in tensors.items():
            array = np.ascontiguousarray(weight.detach().float().cpu().numpy().T)
            model.graph.initializer.append(numpy_helper.from_array(array, name))
        skeleton = f"{output}.down"
        nodes = [helper.make_node("MatMul", [node.input[0], f"{stem}.down"], [skeleton], name=f"{node.name}.down")]
        if not module.interpolative:
            nodes.append(helper.make_node("MatMul", [skeleton, f"{stem}.up"], [output], name=f"{node.name}.up"))
        else:
            rows = f"{stem}.rows"
            model.graph.initializer.append(numpy_helper.from_array(module.rows.cpu().numpy().astype(np.int64), rows))
            nodes += [helper.make_node("MatMul", [skeleton, f"{stem}.up"], [f"{output}.up"], name=f"{node.name}.up"),
                      helper.make_node("Concat", [skeleton, f"{output}.up"], [f"{output}.rows"], name=f"{node.name}.join",
                                       axis=-1),
                      helper.make_node("Gather", [f"{output}.rows", rows], [output], name=f"{node.name}.order", axis=-1)]
        position = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for offset, item in enumerate(nodes):
            model.graph.node.insert(position + offset, item)
        written += 1
    return written


def merge_split_matmuls(model) -> int:
    """Undo a split where its matrices landed on one grid: MatMulNBits nodes that read one input with the same
    bits, block size and accuracy level and feed one Concat become one MatMulNBits over their rows stacked
    (codes, scales and zero points all lead with N), as the builder packs q/k/v: one kernel call, no Concat.
    Returns how many Concats were merged away."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    merged = 0
    for concat in [node for node in model.graph.node if node.op_type == "Concat" and node.name.endswith(".concat")]:
        parts = [producers.get(name) for name in concat.input]
        if not all(p is not None and p.op_type == "MatMulNBits" and len(p.input) == 4 for p in parts):
            continue  # a part with block offsets ends in an Add
        attributes = [{a.name: helper.get_attribute_value(a) for a in p.attribute if a.name != "N"} for p in parts]
        if len({p.input[0] for p in parts}) != 1 or any(a != attributes[0] for a in attributes):
            continue
        stem = concat.name[: -len(".concat")]
        names = [f"{stem}.merged_{suffix}" for suffix in ("Q", "scales", "zero_points")]
        for slot, name in enumerate(names, start=1):
            stacked = np.concatenate([numpy_helper.to_array(initializers[p.input[slot]]) for p in parts], axis=0)
            model.graph.initializer.append(numpy_helper.from_array(stacked, name))
        n = sum(helper.get_attribute_value(next(a for a in p.attribute if a.name == "N")) for p in parts)
        node = helper.make_node("MatMulNBits", [parts[0].input[0], *names], list(concat.output), name=f"{stem}.merged",
                                domain="com.microsoft", N=n, **attributes[0])
        position = list(model.graph.node).index(concat)
        model.graph.node.insert(position, node)
        for old in [*parts, concat]:
            model.graph.node.remove(old)
        merged += 1
    return merged


def gather_from_tables(model) -> None:
    """An embedding Gather reading Transpose(head weight) reads a table initializer instead, so the head's
    recorded grid is found by value and the embedding shares its 4-bit tensors."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    for node in list(model.graph.node):
        transpose = producers.get(node.input[0]) if node.op_type == "Gather" else None
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        table = numpy_helper.to_array(initializers[transpose.input[0]]).T
        name = f"{node.name}.table"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table), name))
        node.input[0] = name
        if not any(transpose.output[0] in other.input for other in model.graph.node if other is not node):
            model.graph.node.remove(transpose)


def rotary_tables_in_graph(graph, model) -> int:
    """The builder stores GroupQueryAttention's rotary tables (``cos_cache``, ``sin_cache``: context × rotary/2
    float32 each, 2 MiB on SmolLM2, 2.4% of its 82.5 MiB int4 file) as initializers; our graph computes them.
    Replaced by nodes that compute them from the model's ``inv_freq`` (Range, Mul, Cos/Sin: transformers' own
    float32 arithmetic), which ONNX Runtime folds into constants when the session starts, so a byte budget
    planned for our graph holds here too. Only tables equal to the computed ones (to 1e-6) are replaced.
    Returns the bytes taken out of the file."""
    from onnx import helper, numpy_helper

    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    initializers = {init.name: init for init in graph.graph.initializer}
    if rotary is None or getattr(rotary, "inv_freq", None) is None or not {"cos_cache", "sin_cache"} <= set(initializers):
        return 0
    inv_freq = rotary.inv_freq.detach().float().cpu().numpy()
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    tables = {name: numpy_helper.to_array(initializers[name]) for name in ("cos_cache", "sin_cache")}
    context, width = tables["cos_cache"].shape
    if width != inv_freq.size:
        return 0
    angles = np.arange(context, dtype=np.float32)[:, None] * inv_freq[None, :]
    if not all(np.allclose(function(angles) * np.float32(scaling), tables[name], rtol=0, atol=1e-6)
               for name, function in (("cos_cache", np.cos), ("sin_cache", np.sin))):
        return 0
    constants = {"rotary.start": np.float32(0), "rotary.limit": np.float32(context), "rotary.delta": np.float32(1),
                 "rotary.axes": np.asarray([1], np.int64), "rotary.inv_freq": inv_freq[None, :],
                 "rotary.scaling": np.float32(scaling)}
    nodes = [helper.make_node("Range", ["rotary.start", "rotary.limit", "rotary.delta"], ["rotary.positions"]),
             helper.make_node("Unsqueeze", ["rotary.positions", "rotary.axes"], ["rotary.column"]),
             helper.make_node("Mul", ["rotary.column", "rotary.inv_freq"], ["rotary.angles"])]
    for name, op in (("cos_cache", "Cos"), ("sin_cache", "Sin")):
        if scaling == 1.0:
            nodes.append(helper.make_node(op, ["rotary.angles"], [name]))
        else:
            nodes += [helper.make_node(op, ["rotary.angles"], [f"rotary.{op}"]),
                      helper.make_node("Mul", [f"rotary.{op}", "rotary.scaling"], [name])]
    saved = sum(tables[name].nbytes for name in tables)
    for name in tables:
        graph.graph.initializer.remove(initializers[name])
    for name, value in constants.items():
        graph.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    for position, node in enumerate(nodes):
        node.name = f"/model/rotary_tables/{node.op_type}_{position}"
        graph.graph.node.insert(position, node)
    return saved


def float_weight_matmuls(model) -> list[str]:
    """MatMul nodes that still read a 2-D float initializer (weights the grids did not cover; the block sums
    and offsets written beside an offset grid are float by design)."""
    from .quantize import is_block_offset_matmul

    initializers = {init.name: init for init in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in initializers
            and len(initializers[node.input[1]].dims) == 2 and not is_block_offset_matmul(node)]


def check_computes_the_model(built: Path, model, tokens: int = 16, tolerance: float = 1e-3) -> None:
    """The builder's fp32 graph gives the PyTorch model's logits (a configuration it reads differently is
    refused here, not shipped): one seeded sequence, max |Δ| within ``tolerance`` of the logits' scale."""
    import torch

    from .onnx_decoder import ONNXDecoder

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator)
    with torch.no_grad():
        expected = model(ids).logits.float().numpy()
    got = ONNXDecoder(built).logits(ids.numpy())
    error = float(np.abs(got - expected).max())
    if not error <= tolerance * float(np.abs(expected).max()):
        raise InvalidInputError(
            f"onnxruntime-genai's model builder's graph of this model does not compute what transformers computes "
            f"(max |logit difference| {error:.3g} of {float(np.abs(expected).max()):.3g}): export without --graph builder")


def low_rank_projections(model) -> dict:
    """{name: (its out × in matrix, the ``LowRankLinear``)} of every low-rank projection, each product computed once
    (the dense folder the builder reads and the search by value must hold the same bytes)."""
    from asvd_passes.modules import LowRankLinear

    return {name: (module.weight.detach().float().cpu().contiguous(), module)
            for name, module in model.named_modules() if isinstance(module, LowRankLinear)}


def write_dense_folder(model, factored: dict, folder: Path, out: Path) -> None:
    """``out``: ``model`` as a plain checkpoint of its family, each low-rank projection as its dense matrix (what
    the builder can read; it knows no low-rank layer), the tokenizer and generation files of ``folder`` beside it.
    Written only for low-rank models; a dense folder is read by the builder as it is."""
    import copy

    from safetensors.torch import save_file

    out.mkdir(parents=True)
    inner = tuple(f"{name}." for name in factored)
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if key.startswith(inner) or tensor.untyped_storage().data_ptr() in seen:  # factors; a tied head (one tensor)
            continue
        seen.add(tensor.untyped_storage().data_ptr())
        state[key] = tensor.detach().float().cpu().contiguous()
    for name, (weight, module) in factored.items():
        state[f"{name}.weight"] = weight
        bias = module.bias if module.interpolative else module.up.bias
        if bias is not None:
            state[f"{name}.bias"] = bias.detach().float().cpu().contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours: the builder would look for a quantized checkpoint loader
    config.dtype = "float32"
    config.save_pretrained(out)
    for item in folder.iterdir():
        if item.is_file() and item.suffix not in (".safetensors", ".bin", ".pt", ".gguf") and item.name != "config.json" \
                and not item.name.endswith(".index.json"):
            shutil.copy(item, out / item.name)


def builder_graph(folder: Path, staging: Path, reference, grids: dict | None, accuracy_level: int, progress: bool):
    """Write ``staging/model.onnx`` (+ the builder's ``genai_config.json`` and tokenizer files): the builder's
    graph of ``folder`` (checked against ``reference``, the folder loaded in PyTorch) with every low-rank projection
    as its two MatMuls and every recorded grid as MatMulNBits (``grids`` None: float weights).
    Returns (the weight summary, the written ONNX model)."""
    import onnx
    from torch import nn

    from .quantize import weight_summary, write_recorded_grids

    grids = grids or {}
    factored = low_rank_projections(reference)
    inside = tuple(f"{name}." for name in factored)
    matrices = {name: module.weight.detach().float().cpu().numpy() for name, module in reference.named_modules()
                if type(module) is nn.Linear and not name.startswith(inside)}
    matrices.update({name: weight.numpy() for name, (weight, _) in factored.items()})
    with tempfile.TemporaryDirectory(prefix="asvd-builder-", dir=staging.parent) as scratch:
        source = folder
        if factored:
            source = Path(scratch) / "dense"
            write_dense_folder(reference, factored, folder, source)
        built = Path(scratch) / "fp32"
        run_builder(source, built, progress)
        if grids:  # the grids' rounding makes the final graph differ: check the builder's float graph first
            check_computes_the_model(built, reference)
        model = onnx.load(str(built / "model.onnx"))
        split = split_packed_matmuls(model, matrices, set(grids) | set(factored))
        lowrank = low_rank_matmuls(model, factored)
        if grids:
            gather_from_tables(model)
        rotary_saved = rotary_tables_in_graph(model, reference)
        written, shared = write_recorded_grids(model, grids, accuracy_level) if grids else (0, False)
        merged = merge_split_matmuls(model)
        left = float_weight_matmuls(model)
        if lowrank != len(factored) or written != len(grids) or grids and left:
            raise InvalidInputError(
                f"the builder's graph of {folder} holds weights that are not the folder's ({lowrank} of {len(factored)} "
                f"low-rank projections and {written} of {len(grids)} recorded grids found; float MatMuls left: "
                f"{left[:3] if grids else []}); export without --graph builder")
        readers = {name for node in model.graph.node for name in node.input}
        unread = [init for init in model.graph.initializer if init.name not in readers]
        for init in unread:
            model.graph.initializer.remove(init)
        large = model.ByteSize() > 2**31 - 2**26  # protobuf's 2 GiB limit, with room for the graph
        onnx.save(model, str(staging / "model.onnx"), save_as_external_data=large,
                  location="model.onnx.data" if large else None)
        for item in built.iterdir():
            if item.name not in ("model.onnx", "model.onnx.data"):
                shutil.copy(item, staging / item.name)
    if not grids:
        check_computes_the_model(staging, reference)  # float: the graph that ships, builder and rewrite together
    summary = {key: value for key, value in weight_summary(model).items() if grids or not isinstance(value, list)}
    summary.update({"low_rank_projections": lowrank, "packed_matmuls_split": split,
                    "rotary_table_bytes_computed": rotary_saved})  # a float export lists no float weight by name
    if grids:
        summary.update({"tied_embedding_shared": shared, "from_recorded_grids": written,
                        "accuracy_level": accuracy_level, "split_matmuls_merged_again": merged})
    return summary, model
