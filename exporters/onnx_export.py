"""Export a (latent-KV or dense) causal LM to ONNX with an explicit cache in its inputs and outputs.

The exported function is a wrapper whose inputs and outputs are plain tensors (a cache object
cannot cross ``torch.export``): ``input_ids``, ``attention_mask`` (batch, past+seq),
``position_ids`` and, per layer i, the past cache entries; outputs ``logits`` and the present
entries (past + new tokens). For a latent-KV model the entries are ``past_latents.{i}.key`` /
``.value`` of shape (batch, past, r_i); for a dense model ``past_key_values.{i}.key`` / ``.value``
of shape (batch, kv_heads, past, head_dim) (Optimum's naming: the baseline). Attention is exported
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

METADATA_FILE = "asvd_onnx.json"
MODEL_FILE = "model.onnx"
DEFAULT_OPSET = 18


@dataclass
class CacheEntry:
    """One cache tensor of one layer: its input/output names and its fixed (non-dynamic) dims."""

    layer: int
    role: str  # "key" / "value"
    input: str
    output: str
    fixed: dict[str, int]  # e.g. {"width": r} (latent) or {"heads": 3, "head_dim": 64} (dense)


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
    rope: dict | None = None  # {"theta": ..., "rotary_dim": ..., "scaling": ...} or None
    bos_token_id: int | None = None
    eos_token_id: list[int] | None = None
    pad_token_id: int | None = None
    fold_value: str = "always"

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


def _cache_entries(model: nn.Module) -> tuple[str, list[CacheEntry]]:
    latent = _latent_attentions(model)
    if latent:
        if len(latent) != model.config.num_hidden_layers:
            raise ValueError("ONNX export needs every attention layer latent-KV compressed (or none)")
        entries = []
        for attention in latent:
            i = attention.layer_idx
            for role, projection in (("key", attention.k_proj), ("value", attention.v_proj)):
                entries.append(CacheEntry(i, role, f"past_latents.{i}.{role}", f"present_latents.{i}.{role}",
                                          {"width": projection.latent_width}))
        return "latent", entries
    from asvd_passes.kv import find_attention_layers

    entries = []
    for layout in sorted(find_attention_layers(model), key=lambda l: l.layer_idx):
        i = layout.layer_idx
        for role in ("key", "value"):
            entries.append(CacheEntry(i, role, f"past_key_values.{i}.{role}", f"present.{i}.{role}",
                                      {"heads": layout.kv_heads, "head_dim": layout.head_dim}))
    return "dense", entries


class CacheIO(nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) → (logits, *present)`` over plain tensors."""

    def __init__(self, model: nn.Module, kind: str, layers: int):
        super().__init__()
        self.model = model
        self.kind = kind
        self.layers = layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            key, value = past[2 * i], past[2 * i + 1]
            if self.kind == "latent":  # the latent cache stores (batch, 1, seq, r)
                key, value = key[:, None], value[:, None]
            cache.update(key, value, i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for i in range(self.layers):
            key, value = cache.layers[i].keys, cache.layers[i].values
            if self.kind == "latent":
                key, value = key[:, 0], value[:, 0]
            present += [key, value]
        return (out.logits, *present)


def _rope_settings(model: nn.Module) -> dict | None:
    from asvd_passes.kv.modules import rotary_embedding

    rotary = rotary_embedding(model)
    if rotary is None:
        return None
    config = model.config
    return {
        "rotary_dim": int(2 * rotary.inv_freq.numel()),
        "theta": getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta"),
        "parameters": getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None),
        "applied": "after rebuilding K from the latent" ,
    }


@contextlib.contextmanager
def _fold_policy(policy: str):
    from asvd_passes.kv import LatentKVAttention

    previous = LatentKVAttention.fold_policy
    LatentKVAttention.fold_policy = policy
    try:
        yield
    finally:
        LatentKVAttention.fold_policy = previous


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
        tensors.append(torch.randn(*shape, generator=generator).to(device=device, dtype=dtype))
    return ids, mask, positions, tensors


def export_onnx(
    model_or_path,
    out_dir: str | Path,
    opset: int = DEFAULT_OPSET,
    dtype: str = "fp32",
    device: str = "cpu",
    fold_value: str = "always",
) -> ExportMetadata:
    """Export to ``out_dir/model.onnx`` (+ ``asvd_onnx.json`` and the tokenizer), written atomically.

    ``fold_value``: how latent V is read in the exported graph: ``always`` (attend over the V latent,
    then V's up: cheapest for decoding), ``never`` (rebuild V), ``auto`` is not exportable (it
    decides per call from the shapes).
    """
    import onnx

    from asvd_passes.models import load_model_and_tokenizer
    from asvd_passes.serialization import atomic_directory

    if fold_value not in ("always", "never"):
        raise ValueError(f"fold_value must be 'always' or 'never' for export, got {fold_value!r}")
    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"dtype must be fp32 or fp16, got {dtype!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    tokenizer = None
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
    else:
        model, tokenizer = load_model_and_tokenizer(model_or_path)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    model = model.to(device=device, dtype=torch_dtype).eval()
    previous_attention = model.config._attn_implementation
    model.set_attn_implementation("eager")  # explicit MatMul/Softmax with the model's own mask
    kind, entries = _cache_entries(model)
    layers = model.config.num_hidden_layers
    wrapper = CacheIO(model, kind, layers).eval()
    ids, mask, positions, past = _example_inputs(model, entries)

    batch, seq, past_len = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    total = torch.export.Dim.AUTO
    past_axes = [({0: batch, 1: past_len} if kind == "latent" else {0: batch, 2: past_len}) for _ in entries]
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: seq}, "past": tuple(past_axes)}
    inputs = ["input_ids", "attention_mask", "position_ids"] + [e.input for e in entries]
    outputs = ["logits"] + [e.output for e in entries]

    quant = getattr(model.config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else (quant or {})
    eos = model.config.eos_token_id
    metadata = ExportMetadata(
        kind=kind, num_layers=layers, vocab_size=model.config.vocab_size, dtype=dtype, opset=opset,
        inputs=inputs, outputs=outputs, cache=entries,
        kv_ranks=(quant.get("kv") or {}).get("layers", {}), kv_group_size=(quant.get("kv") or {}).get("group_size"),
        weight_ranks=quant.get("ranks", {}), rope=_rope_settings(model),
        bos_token_id=model.config.bos_token_id, eos_token_id=[eos] if isinstance(eos, int) else eos,
        pad_token_id=model.config.pad_token_id, fold_value=fold_value,
    )
    with atomic_directory(out_dir) as staging, _fold_policy(fold_value), torch.no_grad():
        staging = Path(staging)
        program = torch.onnx.export(
            wrapper, (ids, mask, positions, *past), dynamo=True, dynamic_shapes=dynamic,
            input_names=inputs, output_names=outputs, opset_version=opset, verbose=False,
        )
        program.save(str(staging / MODEL_FILE), external_data=_needs_external_data(model))
        proto = onnx.load(str(staging / MODEL_FILE), load_external_data=False)
        entry = proto.metadata_props.add()
        entry.key, entry.value = "asvd_onnx", metadata.to_json()
        onnx.save(proto, str(staging / MODEL_FILE))
        onnx.checker.check_model(str(staging / MODEL_FILE), full_check=True)
        (staging / METADATA_FILE).write_text(metadata.to_json())
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    model.set_attn_implementation(previous_attention)
    return metadata


def _needs_external_data(model: nn.Module) -> bool:
    """Protobuf caps one file at 2 GiB; larger models keep their weights in a side file."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30
