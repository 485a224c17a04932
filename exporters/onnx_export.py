"""Export a (latent-KV or dense) causal LM to ONNX with an explicit cache in its inputs and outputs.

The exported function is a wrapper whose inputs and outputs are plain tensors (a cache object
cannot cross ``torch.export``): ``input_ids``, ``attention_mask`` (batch, past+seq),
``position_ids`` and, per layer i, the past cache entries; outputs ``logits`` and the present
entries (past + new tokens). For a latent-KV model the entries are ``past_latents.{i}.key`` /
``.value`` of shape (batch, past, r_i); for a dense model ``past_key_values.{i}.key`` / ``.value``
of shape (batch, kv_heads, past, head_dim) (Optimum's naming: the baseline).

``layout="genai"`` writes what onnxruntime-genai's generic ``decoder`` model accepts: every cache
entry 4-D ``(batch, heads, past, head_size)`` named ``past_key_values.{i}.key``/``present.{i}.key``,
K and V of one layer equally wide, plus ``genai_config.json``. A dense cache already is that. A
latent layer's K and V latents (widths r_k ≠ r_v) are packed: ``[k_latent | v_latent | 0?]`` is cut
into two halves of width ceil((r_k + r_v)/2), stored as one "head" in the key and the value slot.
The cache keeps exactly the latent bytes (plus one zero column when r_k + r_v is odd); the graph
unpacks them before attention. Attention is exported
in its eager form (MatMul, Softmax) with the explicit mask the model builds from
``attention_mask``, so ONNX ``Attention``'s ``is_causal`` corner alignment (onnxruntime#29020) never
applies. Batch, sequence and past length are dynamic.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from asvd_passes.errors import InvalidInputError, UnavailableError

METADATA_FILE = "asvd_onnx.json"
MODEL_FILE = "model.onnx"
GENAI_CONFIG_FILE = "genai_config.json"
DEFAULT_OPSET = 18
LAYOUTS = ("asvd", "genai")
GRAPHS = ("asvd", "builder")


@dataclass
class CacheEntry:
    """One cache tensor of one layer: its input/output names and its fixed (non-dynamic) dims."""

    layer: int
    role: str  # "key" / "value"
    input: str
    output: str
    fixed: dict[str, int]  # e.g. {"width": r} (latent) or {"heads": 3, "head_dim": 64} (dense)
    dtype: str = "float"  # "float" (the export's float type), or a quantized latent's codes: "int8" / "uint8" (4-bit pairs)


@dataclass
class ExportMetadata:
    kind: str  # "latent" or "dense"
    num_layers: int
    vocab_size: int
    dtype: str
    opset: int
    inputs: list[str]
    outputs: list[str]
    cache: list[CacheEntry]
    kv_ranks: dict = field(default_factory=dict)  # attention name -> {"key": [...], "value": [...]}
    kv_group_size: int | None = None
    weight_ranks: dict = field(default_factory=dict)
    rope: dict | None = None  # {"theta", "rotary_dim" (per layer type for Gemma 3), "parameters", "applied"} or None
    bos_token_id: int | None = None
    eos_token_id: list[int] | None = None
    pad_token_id: int | None = None
    fold_value: str = "always"
    absorb_key: str = "never"  # "always": scores on the K latent, no key rebuilt (GPT-2/OPT; "never" where it cannot)
    layout: str = "asvd"  # "asvd": latents (batch, past, r); "genai": packed (batch, 1, past, w) per slot
    packing: dict = field(default_factory=dict)  # genai latent layout: layer -> {"key": r_k, "value": r_v, "width": w}
    weights: str = "fp32"  # fp32 / fp16 / int8 / int4 (MatMulNBits), see exporters.quantize
    block_size: int | None = None
    quantized: dict = field(default_factory=dict)  # what the quantizer turned into N-bit ops and what stayed float
    kv_bits: int | None = None  # quantized latent cache: 8 (int8 codes) or 4 (two codes per uint8); None: float
    graph: str = "asvd"  # "asvd": our torch.onnx export; "builder": onnxruntime-genai's builder's graph, our weights

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ExportMetadata":
        data = json.loads(text)
        data["cache"] = [CacheEntry(**entry) for entry in data["cache"]]
        return cls(**data)


def _latent_attentions(model: nn.Module):
    from asvd_passes.kv import LatentKVAttention

    return sorted((m for m in model.modules() if isinstance(m, LatentKVAttention)), key=lambda m: m.layer_idx)


def packed_width(key_width: int, value_width: int) -> int:
    """Width of each of the two genai slots that hold one layer's ``[k_latent | v_latent]``."""
    return (key_width + value_width + 1) // 2


def stored_widths(attention) -> tuple[int, int]:
    """Numbers per token the cache holds for one latent layer's K and V (bytes, for a quantized cache)."""
    if attention.key_quantizer is not None:
        return attention.key_quantizer.stored_width, attention.value_quantizer.stored_width
    return attention.k_proj.latent_width, attention.v_proj.latent_width


def _stored_dtype(attention) -> str:
    return "float" if attention.key_quantizer is None else str(attention.key_quantizer.code_dtype).replace("torch.", "")


def _cache_entries(model: nn.Module, layout: str = "asvd") -> tuple[str, list[CacheEntry]]:
    latent = _latent_attentions(model)
    if latent:
        if len(latent) != model.config.num_hidden_layers:
            raise InvalidInputError("ONNX export needs every attention layer latent-KV compressed (or none)")
        if len({_stored_dtype(a) for a in latent}) != 1:
            raise InvalidInputError("ONNX export needs every latent layer's cache stored alike (all float or all at one bit width)")
        entries = []
        for attention in latent:
            i = attention.layer_idx
            dtype = _stored_dtype(attention)
            if layout == "genai":
                width = packed_width(*stored_widths(attention))
                for role in ("key", "value"):
                    entries.append(CacheEntry(i, role, f"past_key_values.{i}.{role}", f"present.{i}.{role}",
                                              {"heads": 1, "head_dim": width}, dtype))
                continue
            for role, width in zip(("key", "value"), stored_widths(attention)):
                entries.append(CacheEntry(i, role, f"past_latents.{i}.{role}", f"present_latents.{i}.{role}",
                                          {"width": width}, dtype))
        return "latent", entries
    from asvd_passes.kv import find_attention_layers

    entries = []
    for layout in sorted(find_attention_layers(model, "The ONNX export"), key=lambda l: l.layer_idx):
        i = layout.layer_idx
        for role in ("key", "value"):
            entries.append(CacheEntry(i, role, f"past_key_values.{i}.{role}", f"present.{i}.{role}",
                                      {"heads": layout.kv_heads, "head_dim": layout.head_dim}))
    return "dense", entries


class CacheIO(nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) → (logits, *present)`` over plain tensors.

    ``widths``: per layer ``(r_k, r_v)`` when a latent cache is packed into genai's equal-width slots.
    """

    def __init__(self, model: nn.Module, kind: str, layers: int, widths: list[tuple[int, int]] | None = None):
        super().__init__()
        self.model = model
        self.kind = kind
        self.layers = layers
        self.widths = widths

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            key, value = past[2 * i], past[2 * i + 1]
            if self.widths is not None:  # packed slots (batch, 1, past, w) → latents (batch, 1, past, r)
                key, value = self._unpack(key, value, *self.widths[i])
            elif self.kind == "latent":  # the latent cache stores (batch, 1, seq, r)
                key, value = key[:, None], value[:, None]
            cache.update(key, value, i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for i in range(self.layers):
            key, value = cache.layers[i].keys, cache.layers[i].values
            if self.widths is not None:  # pack only the new tokens; the past slots are appended to as they are
                steps = input_ids.shape[1]
                new_a, new_b = self._pack(key[:, :, -steps:], value[:, :, -steps:])
                key, value = torch.cat([past[2 * i], new_a], dim=2), torch.cat([past[2 * i + 1], new_b], dim=2)
            elif self.kind == "latent":
                key, value = key[:, 0], value[:, 0]
            present += [key, value]
        return (out.logits, *present)

    @staticmethod
    def _unpack(slot_a, slot_b, key_width: int, value_width: int):
        joined = torch.cat([slot_a, slot_b], dim=-1)
        return joined[..., :key_width], joined[..., key_width : key_width + value_width]

    @staticmethod
    def _pack(key, value):
        joined = torch.cat([key, value], dim=-1)
        width = packed_width(key.shape[-1], value.shape[-1])
        joined = nn.functional.pad(joined, (0, 2 * width - joined.shape[-1]))
        return joined[..., :width], joined[..., width:]


def _rope_settings(model: nn.Module) -> dict | None:
    from asvd_passes.families import rope_settings

    return rope_settings(model)


@contextlib.contextmanager
def _attention_policy(fold_value: str, absorb_key: str, value_up_as_linear: bool = False):
    """Export-time switches of the latent attention: V folding, K absorption, a 2-D V up that quantizers can read.

    The traced graph is one graph for prefill and decode, so ``auto`` (decided per call from the
    shapes) cannot be exported; each switch is fixed for the whole graph.
    """
    from asvd_passes.kv import LatentKVAttention
    from asvd_passes.kv.quant import LatentQuantizer

    names = ("fold_policy", "absorb_policy", "value_up_as_linear")
    previous = [getattr(LatentKVAttention, name) for name in names]
    for name, value in zip(names, (fold_value, absorb_key, value_up_as_linear)):
        setattr(LatentKVAttention, name, value)
    LatentQuantizer.onnx_ops = True  # a quantized cache as QuantizeLinear / DequantizeLinear
    try:
        yield
    finally:
        LatentQuantizer.onnx_ops = False
        for name, value in zip(names, previous):
            setattr(LatentKVAttention, name, value)


@contextlib.contextmanager
def _prepared(model: nn.Module, device: str, dtype: torch.dtype):
    """``model`` on ``device``/``dtype``, in eval mode, with eager attention, for the export; all restored after.

    The restore runs on success and on failure alike, and is exact: the original parameter and buffer
    tensors are kept and put back (a cast to fp16 and back would round the weights).
    """
    parameters = [(m, name, p, p.data) for m in model.modules() for name, p in m._parameters.items() if p is not None]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    training = [(m, m.training) for m in model.modules()]
    attention = model.config._attn_implementation
    try:
        model.to(device=device, dtype=dtype).eval()
        model.set_attn_implementation("eager")  # explicit MatMul/Softmax with the model's own mask
        yield model
    finally:
        model.set_attn_implementation(attention)
        for module, name, parameter, data in parameters:
            parameter.data = data
            module._parameters[name] = parameter
        for module, name, buffer in buffers:
            module._buffers[name] = buffer
        for module, mode in training:
            module.training = mode
        for latent in _latent_attentions(model):  # drop the traced (fake) tensors the RoPE cache kept
            if latent.key_embeddings is not None:
                latent.key_embeddings.clear()


def _example_inputs(model, entries, batch=2, seq=3, past=5):
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=generator).to(device)
    mask = torch.ones(batch, past + seq, dtype=torch.long, device=device)
    positions = torch.arange(past, past + seq, device=device)[None].expand(batch, seq).contiguous()
    tensors = []
    for entry in entries:
        if "width" in entry.fixed:
            shape = (batch, past, entry.fixed["width"])
        else:
            shape = (batch, entry.fixed["heads"], past, entry.fixed["head_dim"])
        if entry.dtype == "float":
            tensors.append(torch.randn(*shape, generator=generator).to(device=device, dtype=dtype))
        else:  # quantized latent codes
            codes = torch.randint(0, 256 if entry.dtype == "uint8" else 128, shape, generator=generator)
            tensors.append(codes.to(device=device, dtype=getattr(torch, entry.dtype)))
    return ids, mask, positions, tensors


def export_onnx(
    model_or_path,
    out_dir: str | Path,
    opset: int = DEFAULT_OPSET,
    dtype: str = "fp32",
    device: str = "cpu",
    fold_value: str = "always",
    absorb_key: str = "always",
    layout: str = "asvd",
    weights: str | None = None,
    block_size: int = 32,
    progress: bool = False,
    overwrite: bool = False,
    grids: dict | None = None,
    graph: str = "asvd",
) -> ExportMetadata:
    """Export to ``out_dir/model.onnx`` (+ ``asvd_onnx.json`` and the tokenizer), written atomically.

    An existing non-empty ``out_dir`` is refused before any work unless ``overwrite`` is set and it
    holds ``asvd_onnx.json`` (an export this tool wrote); the model's folder, or one holding it, is
    refused always.

    ``fold_value``: how latent V is read in the exported graph: ``always`` (attend over the V latent,
    then V's up: cheapest for decoding), ``never`` (rebuild V), ``auto`` is not exportable (it
    decides per call from the shapes).
    ``absorb_key``: for families whose K is used as its ``up`` returns it (no RoPE, no K norm:
    GPT-2, OPT), ``always`` scores queries against the K latent (the query goes through K's up; no
    key is rebuilt), ``never`` rebuilds K. Families that cannot absorb rebuild K either way.
    ``layout``: ``asvd`` (latents as (batch, past, r)) or ``genai`` (onnxruntime-genai's 4-D cache,
    ``genai_config.json`` written beside the model; see the module docstring).
    ``weights``: ``fp32``/``fp16`` (the export's float type; default: ``dtype``), or ``int8``/``int4``:
    an fp32 export whose MatMul weights, embedding and LM head ONNX Runtime's MatMulNBits quantizer
    turns into ``block_size``-wide blocks (:mod:`exporters.quantize`).
    ``grids``: int8/int4 only, {module name: ``BlockQuantized``} of weights already on a MatMulNBits
    grid (``asvd quantize``); written from their own codes and scales, not rounded again. A folder
    that ``asvd quantize`` wrote brings its own (its ``asvd_nbits.safetensors``).
    ``graph``: ``asvd`` (our torch.onnx export: any model we compress), or ``builder``: onnxruntime-genai's
    model builder's decoder graph (fused attention and norms, its decode speed) carrying the folder's weights:
    a dense or low-rank model in fp32, or the int8/int4 grids ``asvd quantize`` recorded; no latent KV cache
    (:mod:`exporters.builder_graph`).
    A model object passed in is moved to ``device``/``dtype``, put in eval mode with eager attention
    for the export, and given back as it was (same tensors, modes and attention), also when the
    export fails.
    """
    from asvd_passes.families import check_latent_support
    from asvd_passes.models import load_model_and_tokenizer, local_inputs
    from asvd_passes.serialization import check_output_folder

    from .quantize import check_quantizable, check_weights

    if fold_value not in ("always", "never"):
        raise InvalidInputError(f"fold_value must be 'always' or 'never' for export, got {fold_value!r}")
    if absorb_key not in ("always", "never"):
        raise InvalidInputError(f"absorb_key must be 'always' or 'never' for export, got {absorb_key!r}")
    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if graph not in GRAPHS:
        raise InvalidInputError(f"graph must be one of {GRAPHS}, got {graph!r}")
    weights = weights or dtype
    check_weights(weights, block_size)
    if weights in ("fp32", "fp16"):
        dtype = weights
    elif dtype != "fp32":
        raise InvalidInputError(f"--weights {weights} quantizes an fp32 export; it cannot be combined with dtype {dtype}")
    if dtype not in ("fp32", "fp16"):
        raise InvalidInputError(f"dtype must be fp32 or fp16, got {dtype!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UnavailableError("--device cuda was asked for, but torch sees no CUDA device")
    inputs = local_inputs(model_or_path)
    check_output_folder(out_dir, overwrite, METADATA_FILE, inputs)  # before loading and tracing, which take minutes
    tokenizer = None
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
    else:
        model, tokenizer = load_model_and_tokenizer(model_or_path)
    if grids is None and weights in ("int8", "int4") and not isinstance(model_or_path, nn.Module):
        from asvd_passes.models import resolve_model_path
        from asvd_passes.quantization.calibrate import grids_of, load_sidecar

        sidecar = load_sidecar(resolve_model_path(model_or_path))
        grids = grids_of(model, sidecar) if sidecar else None
    check_latent_support(model, "The ONNX export")  # attention the family table does not cover: refused before tracing
    check_quantizable(model, weights)
    if graph == "builder":
        _check_builder_graph(model, model_or_path, weights, grids)
        return _export_builder_graph(model, Path(model_or_path), Path(out_dir), weights, grids, progress, overwrite,
                                     inputs)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    with _prepared(model, device, torch_dtype):
        return _export(model, tokenizer, Path(out_dir), opset, dtype, fold_value, absorb_key, layout, weights,
                       block_size, progress, overwrite, inputs, grids)


def _export(model, tokenizer, out_dir: Path, opset, dtype, fold_value, absorb_key, layout, weights, block_size,
            progress, overwrite, inputs, grids=None) -> ExportMetadata:
    """The export proper, on a model that :func:`_prepared` has set up."""
    import onnx

    from asvd_passes.serialization import atomic_directory

    from .quantize import quantize_onnx

    kind, entries = _cache_entries(model, layout)
    layers = model.config.num_hidden_layers
    packing, widths = {}, None
    if kind == "latent" and layout == "genai":
        latent = _latent_attentions(model)
        widths = [stored_widths(a) for a in latent]
        packing = {str(a.layer_idx): {"key": k, "value": v, "width": packed_width(k, v)}
                   for a, (k, v) in zip(latent, widths)}
    wrapper = CacheIO(model, kind, layers, widths).eval()
    ids, mask, positions, past = _example_inputs(model, entries)

    batch, seq, past_len = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    total = torch.export.Dim.AUTO
    past_axes = [({0: batch, 1: past_len} if "width" in e.fixed else {0: batch, 2: past_len}) for e in entries]
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: seq}, "past": tuple(past_axes)}
    inputs = ["input_ids", "attention_mask", "position_ids"] + [e.input for e in entries]
    outputs = ["logits"] + [e.output for e in entries]

    quant = _quantization_record(model.config)
    eos = model.config.eos_token_id
    metadata = ExportMetadata(
        kind=kind, num_layers=layers, vocab_size=model.config.vocab_size, dtype=dtype, opset=opset,
        inputs=inputs, outputs=outputs, cache=entries,
        kv_ranks=(quant.get("kv") or {}).get("layers", {}), kv_group_size=(quant.get("kv") or {}).get("group_size"),
        weight_ranks=quant.get("ranks", {}), rope=_rope_settings(model),
        bos_token_id=model.config.bos_token_id, eos_token_id=[eos] if isinstance(eos, int) else eos,
        pad_token_id=model.config.pad_token_id, fold_value=fold_value, layout=layout, packing=packing,
        absorb_key=absorb_key if any(a.can_absorb_key() for a in _latent_attentions(model)) else "never",
        weights=weights, block_size=block_size if weights in ("int8", "int4") else None,
        kv_bits=next((a.key_quantizer.bits for a in _latent_attentions(model) if a.key_quantizer is not None), None),
    )
    with atomic_directory(out_dir, overwrite, METADATA_FILE, inputs) as staging, _attention_policy(fold_value, absorb_key, weights in ("int8", "int4")), torch.no_grad():
        staging = Path(staging)
        _progress(progress, f"tracing and converting to ONNX ({kind} cache, {layout} layout)")
        program = torch.onnx.export(
            wrapper, (ids, mask, positions, *past), dynamo=True, dynamic_shapes=dynamic,
            input_names=inputs, output_names=outputs, opset_version=opset, verbose=False,
            custom_translation_table=_quantize_translations() if metadata.kv_bits is not None else None,
        )
        external = _needs_external_data(model)
        program.save(str(staging / MODEL_FILE), external_data=external)
        del program
        if weights in ("int8", "int4"):
            _progress(progress, f"quantizing weights to {weights} (MatMulNBits, block {block_size})")
            metadata.quantized = quantize_onnx(staging / MODEL_FILE, bits=int(weights[3:]), block_size=block_size,
                                               external_data=external, grids=grids)
        proto = onnx.load(str(staging / MODEL_FILE), load_external_data=False)
        for node in proto.graph.node:
            # The dynamo exporter annotates every node with its Python stack trace, FX node and module path:
            # 3 MB of a SmolLM2 export (more than its float norms and biases), and this machine's file paths.
            del node.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = "asvd_onnx", metadata.to_json()
        onnx.save(proto, str(staging / MODEL_FILE))
        _progress(progress, "checking the ONNX model")
        onnx.checker.check_model(str(staging / MODEL_FILE), full_check=True)
        (staging / METADATA_FILE).write_text(metadata.to_json())
        if layout == "genai":
            (staging / GENAI_CONFIG_FILE).write_text(json.dumps(genai_config(model, metadata), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return metadata


def _quantization_record(config) -> dict:
    """The model's ``quantization_config`` as a dict (empty for a model this tool did not compress)."""
    quant = getattr(config, "quantization_config", None)
    return quant.to_dict() if hasattr(quant, "to_dict") else (quant or {})


def _check_builder_graph(model: nn.Module, source, weights: str, grids: dict | None) -> None:
    """What ``graph="builder"`` can carry (checked before work): a folder of a dense or low-rank model, in fp32 or on
    the int8/int4 grids that ``asvd quantize`` recorded; no latent KV cache."""
    from asvd_passes.kv import LatentKVAttention

    if isinstance(source, nn.Module) or source is None:
        raise InvalidInputError("--graph builder exports a folder (the builder reads it from disk): save the model first")
    if weights == "fp16":
        raise InvalidInputError("--graph builder writes fp32 graphs (or int8/int4 from recorded grids): use --weights fp32")
    if weights in ("int8", "int4") and not grids:
        raise InvalidInputError(
            "--graph builder writes the int8/int4 grids that `asvd quantize` recorded (asvd_nbits.safetensors): "
            "quantize the folder first and export with --weights int4|int8")
    if any(isinstance(m, LatentKVAttention) for m in model.modules()):
        raise InvalidInputError("--graph builder has no form for a latent KV cache (the builder's attention reads a "
                                "dense cache): export this model with the default graph")
    bits = {q.bits for q in (grids or {}).values()}
    if weights == "int8" and bits != {8} or weights == "int4" and 4 not in bits:
        raise InvalidInputError(f"the folder's recorded grids are {sorted(bits)}-bit; --weights {weights} does not describe them")


def _export_builder_graph(model, folder: Path, out_dir: Path, weights: str, grids: dict | None, progress: bool,
                          overwrite: bool, inputs) -> ExportMetadata:
    """The builder's graph with our weights (:mod:`exporters.builder_graph`; its tokenizer files come with it)."""
    from asvd_passes.serialization import atomic_directory

    from .builder_graph import builder_graph
    from .quantize import CPU_ACCURACY_LEVEL

    with atomic_directory(out_dir, overwrite, METADATA_FILE, inputs) as staging:
        staging = Path(staging)
        _progress(progress, "building onnxruntime-genai's decoder graph and writing our weights into it")
        quantized, proto = builder_graph(folder, staging, model, grids if weights in ("int8", "int4") else None,
                                         CPU_ACCURACY_LEVEL, progress)
        names = [i.name for i in proto.graph.input]
        outputs = [o.name for o in proto.graph.output]
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        cache = [CacheEntry(layer, role, f"past_key_values.{layer}.{role}", f"present.{layer}.{role}",
                            {"heads": heads, "head_dim": head_dim})
                 for layer in range(config.num_hidden_layers) for role in ("key", "value")]
        missing = [name for e in cache for name in (e.input, e.output) if name not in names + outputs]
        if missing or len(names) != 2 + len(cache) or len(outputs) != 1 + len(cache):
            raise InvalidInputError(f"the builder's graph has other inputs/outputs than expected ({missing[:2]})")
        # The builder lists every layer's keys, then every layer's values; our runner pairs them with ``cache``.
        names = ["input_ids", "attention_mask"] + [e.input for e in cache]
        outputs = ["logits"] + [e.output for e in cache]
        eos = config.eos_token_id
        quant = _quantization_record(config)
        metadata = ExportMetadata(
            kind="dense", num_layers=config.num_hidden_layers, vocab_size=config.vocab_size, dtype="fp32",
            weight_ranks=quant.get("ranks", {}),
            opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            inputs=names, outputs=outputs, cache=cache, rope=None, bos_token_id=config.bos_token_id,
            eos_token_id=[eos] if isinstance(eos, int) else eos, pad_token_id=config.pad_token_id, layout="genai",
            weights=weights, block_size=None, quantized=quantized, graph="builder")
        (staging / METADATA_FILE).write_text(metadata.to_json())
    return metadata


def _quantize_translations() -> dict:
    """A quantized latent cache: torch's ``quantized_decomposed`` per-channel ops as ONNX QuantizeLinear
    (+ Clip to the code range) and DequantizeLinear, onnxscript's own translations (torch.onnx's default
    registry does not load them)."""
    from torch.ao.quantization.fx import _decomposed  # noqa: F401  (registers the ops)
    from onnxscript.function_libs.torch_lib.ops import quantized_decomposed as translations

    ops = torch.ops.quantized_decomposed
    return {ops.quantize_per_channel.default: translations.quantized_decomposed_quantize_per_channel,
            ops.dequantize_per_channel.default: translations.quantized_decomposed_dequantize_per_channel}


def _progress(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[export] {message}", flush=True)


def genai_config(model: nn.Module, metadata: ExportMetadata) -> dict:
    """onnxruntime-genai's ``genai_config.json`` for the generic ``decoder`` model type.

    genai reads each layer's heads and head size from the fixed dims of its key input (a latent layer:
    1 head of its packed width), so ``num_key_value_heads``/``head_size`` here describe the widest layer.
    """
    config = model.config
    heads = max(e.fixed["heads"] for e in metadata.cache)
    head_size = max(e.fixed["head_dim"] for e in metadata.cache)
    eos = metadata.eos_token_id or []
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": metadata.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": metadata.pad_token_id if metadata.pad_token_id is not None else (eos[0] if eos else 0),
            "context_length": int(context),
            "vocab_size": metadata.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": head_size,
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": metadata.num_layers,
                "num_key_value_heads": heads,
                "inputs": {
                    "input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": int(context), "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def _needs_external_data(model: nn.Module) -> bool:
    """Protobuf caps one file at 2 GiB; larger models keep their weights in a side file."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30
