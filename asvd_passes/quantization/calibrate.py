"""GPTQ of a whole model, one decoder block at a time, and the sidecar that records each matrix's grid.

Block i is calibrated on the outputs of the already-quantized blocks before it (as GPTQ does): a
forward pre-hook on every ``nn.Linear`` of the block sums XᵀX of its input (float64) over the
calibration windows, every matrix is quantized against its own Gram matrix, and the quantized
block produces the next block's inputs. A factored projection's ``down`` and ``up`` are two
``Linear``s: ``up``'s Gram matrix is that of ``down``'s outputs, down·H·downᵀ. The LM head comes last,
on the final hidden states of the quantized blocks (its input: the final norm's output); a head tied
to the embedding is one tensor, so the embedding then reads the head's grid values too.

Each quantized weight is written back as its dequantized float32 values, exactly on the grid: the
folder stays a normal float checkpoint, and ``asvd_nbits.safetensors`` beside it holds every
matrix's scales and zero points (metadata: bits and block size), from which the ONNX export writes
MatMulNBits initializers without rounding again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidInputError
from .gptq import DAMPING, gptq
from .matmul_nbits import BlockQuantized, check_grid, from_grid, quantize_rtn

SIDECAR_FILE = "asvd_nbits.safetensors"
ALGORITHMS = ("gptq", "rtn")


class _StopForward(Exception):
    pass


def _linears(module: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    return {f"{prefix}.{name}" if name else prefix: m for name, m in module.named_modules() if type(m) is nn.Linear}


def _check_quantizable(model: nn.Module, bits: int, choices: dict | None = None) -> None:
    from ..modules import LowRankLinear

    for name, module in model.named_modules():
        if not (isinstance(module, LowRankLinear) and module.interpolative):
            continue
        low = min([bits] + [c.bits for n, c in (choices or {}).items() if n.startswith(f"{name}.")])
        if low < 8:
            raise InvalidInputError(
                f"{low}-bit quantization would destroy {name} (interpolative low-rank form, whose coefficients "
                "amplify rounding errors): quantize to 8 bits, or compress with --lowrank-form pair")


class _GramRecorder:
    """Sums XᵀX (float64) of each named Linear's input while registered.

    Linears called one after another on the same tensor (q/k/v, gate/up) share one Gram matrix: the
    first call of each forward decides, so the sum is taken once per input.
    """

    def __init__(self, linears: dict[str, nn.Linear]):
        self.grams = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
                      for name, m in linears.items()}
        self.owner: dict[str, str] = {}  # name → the Linear whose Gram matrix it shares
        self._previous: tuple[torch.Tensor, str] | None = None
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            previous = self._previous
            if previous is not None and previous[0] is x:
                self.owner.setdefault(name, previous[1])
                if self.owner[name] != name:
                    self.grams[name] = self.grams[self.owner[name]]
                    return
            self.owner.setdefault(name, name)
            self._previous = (x, self.owner[name])
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            self.grams[name] += (flat.T @ flat).double().cpu()
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._previous = None


def _quantize_into(linears: dict[str, nn.Linear], grams: dict, bits: int, block_size: int, algorithm: str,
                   damping: float, clip: bool, offsets: bool = False, choices: dict | None = None
                   ) -> dict[str, BlockQuantized]:
    done = {}
    for name, module in linears.items():
        grid = (bits, block_size, offsets)
        if choices and name in choices:  # a budget plan's grid for this matrix
            grid = (choices[name].bits, choices[name].block_size, choices[name].offsets)
        weight = module.weight
        if algorithm == "gptq":
            quantized = gptq(weight, grams[name], grid[0], grid[1], damping, clip, grid[2])
        else:
            quantized = quantize_rtn(weight, *grid)
        with torch.no_grad():
            weight.copy_(quantized.dequantize().to(weight.device, weight.dtype))
        done[name] = quantized
    return done


@torch.no_grad()
def quantize_model(model: nn.Module, windows: torch.Tensor, bits: int = 4, block_size: int = 32,
                   algorithm: str = "gptq", damping: float = DAMPING, include_head: bool = True,
                   clip: bool = True, offsets: bool = False, choices: dict | None = None,
                   progress: bool = True) -> dict[str, BlockQuantized]:
    """Quantize every ``nn.Linear`` of ``model``'s decoder blocks (and the LM head) in place; return the grids.

    ``windows``: calibration token ids (samples × seqlen). ``clip``: GPTQ searches each block's range.
    ``offsets``: the decoder blocks' matrices get block offsets (each block on its own [min, max] grid,
    :mod:`.matmul_nbits`); the LM head keeps integer zero points, so a tied embedding still shares its
    4-bit tensors. ``choices`` ({name: :class:`.plan.GridChoice`}, a budget plan) overrides bits, block size
    and offsets matrix by matrix.
    The model must compute in float32 (its weights are written back exactly on the grid, which a
    16-bit type cannot hold).
    """
    from ..allocation.block_cache import decoder_layers
    from ..graph.match import output_projection_name
    from ..pipelines.blocks import block_prefix, record_block_inputs

    check_grid(bits, block_size)
    if algorithm not in ALGORITHMS:
        raise InvalidInputError(f"quantization algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise InvalidInputError(f"quantize a float32 model (weights on the grid need float32), not {dtype}")
    _check_quantizable(model, bits, choices)
    model.eval()
    layers = decoder_layers(model)
    prefix = block_prefix(model)
    device = next(model.parameters()).device
    hidden, calls = record_block_inputs(model, windows, device)
    hidden = [x.to(device) for x in hidden]
    results: dict[str, BlockQuantized] = {}
    for index, layer in enumerate(tqdm(layers, desc=f"{algorithm} int{bits}", disable=not progress)):
        linears = _linears(layer, f"{prefix}.{index}")
        recorder = _GramRecorder(linears)
        try:
            for x in hidden:
                layer(x, *calls[index].args, **calls[index].kwargs)
        finally:
            recorder.close()
        results.update(_quantize_into(linears, recorder.grams, bits, block_size, algorithm, damping, clip, offsets,
                                      choices))
        del recorder
        hidden = [layer(x, *calls[index].args, **calls[index].kwargs) for x in hidden]
    head = model.get_output_embeddings()
    if include_head and type(head) is nn.Linear:
        name = output_projection_name(model)
        recorder = _GramRecorder({name: head})

        def stop(module, args):
            raise _StopForward

        handle = head.register_forward_pre_hook(stop)  # after the recorder's: the logits are not needed
        try:
            for row in windows:
                try:
                    model(input_ids=row[None].to(device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
            recorder.close()
        results.update(_quantize_into({name: head}, recorder.grams, bits, block_size, algorithm, damping, clip,
                                      choices=choices))
    return results


def save_sidecar(folder: str | Path, grids: dict[str, BlockQuantized]) -> Path:
    """Write every matrix's scales and zero points (bits and block size in the metadata) into ``folder``."""
    from safetensors.torch import save_file

    tensors, matrices = {}, {}
    for name, q in grids.items():
        tensors[f"{name}.scales"] = q.scales.contiguous()
        tensors[f"{name}.zero_points"] = q.zero_points.contiguous()
        if q.offsets is not None:
            tensors[f"{name}.offsets"] = q.offsets.contiguous()
        matrices[name] = {"bits": q.bits, "block_size": q.block_size, "shape": list(q.shape)}
    path = Path(folder) / SIDECAR_FILE
    save_file(tensors, str(path), metadata={"format": "matmul_nbits", "matrices": json.dumps(matrices)})
    return path


def load_sidecar(folder: str | Path) -> dict[str, dict] | None:
    """{matrix name: {bits, block_size, shape, scales, zero_points, offsets (or None)}} from ``folder``, or None without a sidecar."""
    from safetensors import safe_open

    path = Path(folder) / SIDECAR_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as handle:
        matrices = json.loads(handle.metadata()["matrices"])
        for name, entry in matrices.items():
            entry["scales"] = handle.get_tensor(f"{name}.scales")
            entry["zero_points"] = handle.get_tensor(f"{name}.zero_points")
            entry["offsets"] = handle.get_tensor(f"{name}.offsets") if f"{name}.offsets" in handle.keys() else None
    return matrices


def grids_of(model: nn.Module, sidecar: dict[str, dict]) -> dict[str, BlockQuantized]:
    """Each recorded matrix of ``model`` with its codes, checked to lie exactly on its recorded grid."""
    modules = dict(model.named_modules())
    grids = {}
    for name, entry in sidecar.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise InvalidInputError(f"the quantization sidecar names {name}, which this model does not have")
        grids[name] = from_grid(module.weight, entry["scales"], entry["zero_points"], entry["bits"],
                                entry["block_size"], entry.get("offsets"))
    return grids


def output_marker(source) -> str:
    """The file that marks an output folder as ours: the compress report where the source has one (the
    quantized folder holds it too, so ``asvd compress --weights --overwrite`` may replace a compress
    output), else the sidecar."""
    from ..report import REPORT_FILE

    return REPORT_FILE if source is not None and (Path(source) / REPORT_FILE).is_file() else SIDECAR_FILE


def save_quantized(model: nn.Module, tokenizer, grids: dict[str, BlockQuantized], out: str | Path,
                   source: str | Path | None = None, settings: dict | None = None, overwrite: bool = False,
                   inputs=(), marker: str = SIDECAR_FILE) -> None:
    """Write the quantized model (a float32 checkpoint, weights on their grids), its tokenizer and the sidecar.

    A compressed ``source`` folder's side files (settings, report) come along, so ``asvd inspect`` still
    reads the folder; ``settings`` (how it was quantized) go to ``asvd_nbits.json``.
    """
    import shutil

    from ..report import RANKS_PLOT, REPORT_FILE
    from ..serialization import atomic_directory

    with atomic_directory(out, overwrite, marker, inputs) as staging:
        staging = Path(staging)
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if source is not None and Path(source).is_dir():
            for name in (REPORT_FILE, "asvd_config.json", RANKS_PLOT):
                if (Path(source) / name).is_file():
                    shutil.copy2(Path(source) / name, staging / name)
        save_sidecar(staging, grids)
        (staging / "asvd_nbits.json").write_text(json.dumps(settings or {}, indent=2))
