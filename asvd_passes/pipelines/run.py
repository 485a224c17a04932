"""Run the sequential pipeline for an ``ASVDCompressor``: resident model, or shards read block by block."""

from __future__ import annotations

import time

import torch

from .. import kv
from ..config import ASVDConfig
from ..data import SELFGEN
from ..errors import InvalidInputError
from ..report import REPORT_FILE, build_report, model_params, quantization_config, write_side_files
from ..serialization import atomic_directory
from .blocks import block_prefix
from .heap import map_large_allocations
from .memory import check_budget, empty_model, estimate, resolve_device
from .sequential import SequentialPipeline
from .weights import ResidentWeights, ShardedWeights, ShardWriter


def compress_sequentially(compressor, config: ASVDConfig, calibration, save_dir, filter_fn, progress: bool,
                          overwrite: bool = False):
    """Compress with :class:`SequentialPipeline`; returns the ``CompressionReport``."""
    start = time.perf_counter()
    map_large_allocations()  # from loading on, freed block-sized buffers leave the process (heap.py)
    device = resolve_device(config.device)
    # Read block by block from the shards when the model is not in memory yet and the output can be
    # written as it is made; without save_dir the compressed model must end up in memory anyway.
    source = config.calibration if calibration is None else calibration
    selfgen = not isinstance(source, torch.Tensor) and source in (None, SELFGEN)
    # Self-generated calibration text needs the whole model to generate it, so it loads it whole.
    offloaded = compressor._model is None and compressor.source is not None and save_dir is not None and not selfgen
    if offloaded:
        model = empty_model(compressor.source)
    else:
        model = compressor.model.eval()
    prefix = block_prefix(model)
    check_budget(estimate(model, model.get_submodule(prefix), config.calib_samples, config.seqlen), config.max_memory)
    if any(type(m).__name__ in ("LowRankLinear", "LatentKVAttention") for m in model.modules()):
        raise InvalidInputError("This model is already ASVD-compressed; compress the original model instead")
    # Attention the family table does not cover is refused before any work.
    layouts = kv.find_attention_layers(model, "The KV pass (--kv-ratio)") if config.latent_kv else None
    storage_dtype = next(model.parameters()).dtype
    if layouts:  # a byte budget no plan can meet: refused before any work
        kv.plan.check_budget(config, layouts, storage_dtype.itemsize)
    # CPU kernels are slow (or missing) in half precision: compute in float32, store in the model's dtype.
    compute_dtype = torch.float32 if device.type == "cpu" else None
    weights = (ShardedWeights(compressor.source, model, device, compute_dtype) if offloaded
               else ResidentWeights(model, device, compute_dtype))
    tick = time.perf_counter()
    weights.prepare_rest(prefix)
    compressor._model = model if not offloaded else None
    windows = _calibration(compressor, model, config, calibration, progress)
    seconds = {"calibration_data": time.perf_counter() - tick}
    params_before = model_params(model)

    def select(name, module):
        return filter_fn is None or filter_fn(name, module)

    def run(on_block_done=None):
        pipeline = SequentialPipeline(model, weights, config, windows, device, select, layouts,
                                      on_block_done=on_block_done, offload_folder=config.offload_folder,
                                      progress=progress)
        return pipeline.run()

    if not offloaded:
        result = run()
        weights.finish()
        compressor.model = model
        report = _report(compressor, model, config, result, windows, params_before, seconds, start, source)
        _set_quantization_config(model, config, result, windows, source)
        if save_dir is not None:
            compressor.save(save_dir, config, report, overwrite)
        return report

    with atomic_directory(save_dir, overwrite, REPORT_FILE, compressor.input_paths()) as staging:
        writer = ShardWriter(staging, model)

        def write_block(name, block):
            writer.write({f"{name}.{key}": value.to(storage_dtype) if value.is_floating_point() else value
                          for key, value in block.state_dict().items()})

        result = run(write_block)
        writer.write(weights.rest_state_dict(prefix))
        writer.finish()
        _set_quantization_config(model, config, result, windows, source)
        model.config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if compressor.tokenizer is not None:
            compressor.tokenizer.save_pretrained(staging)
        report = _report(compressor, model, config, result, windows, params_before, seconds, start, source)
        write_side_files(staging, config, report)
    # The compressor now stands for the compressed model, read lazily from what was written.
    compressor.source = str(save_dir)
    compressor._model = None
    return report


def _calibration(compressor, model, config, calibration, progress) -> torch.Tensor:
    saved = compressor._model
    compressor._model = model
    try:
        return compressor._calibration(config, calibration, progress)
    finally:
        compressor._model = saved


def _set_quantization_config(model, config, result, windows, source) -> None:
    model.config.quantization_config = quantization_config(
        config, result.plan, result.kv_plan, windows,
        source if isinstance(source, (str, type(None))) else "tensor", "sequential")


def _report(compressor, model, config, result, windows, params_before, seconds, start, source):
    seconds = dict(seconds, **result.seconds)
    seconds["compress"] = time.perf_counter() - start
    return build_report(config, result.plan, result.kv_plan, result.shapes, seconds, int(windows.numel()),
                        params_before, model_params(model), getattr(compressor, "_pipeline", None))
