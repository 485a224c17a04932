"""``ASVDCompressor``: orchestration only (Optimum ``OptimumQuantizer`` style).

It loads (lazily), picks a pipeline (``pipelines/``: whole-model or sequential), builds the
calibration windows, and saves. The algorithms live in their own modules (scaling, decompose,
allocation, kv), the observers in ``graph/``, the data flow in ``pipelines/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from optimum.quantization_base import OptimumQuantizer
from torch import nn

from .config import ASVDConfig
from .data import calibration_windows
from .errors import InvalidInputError
from .pipelines.whole import Analysis, NoProjectionsError, WholeModelPipeline
from .report import REPORT_FILE, RANKS_PLOT, CompressionReport, build_report, model_params, quantization_config, write_side_files
from .serialization import atomic_directory, check_output_folder


__all__ = ["ASVDCompressor", "Analysis", "CompressionReport", "NoProjectionsError", "REPORT_FILE", "RANKS_PLOT"]


class ASVDCompressor(OptimumQuantizer):
    """Compress a transformers causal LM with (activation-aware) SVD.

    >>> compressor = ASVDCompressor.from_pretrained("path/or/hub-id")
    >>> report = compressor.compress(ASVDConfig(method="whiten", param_ratio=0.9), save_dir="out")
    """

    def __init__(self, model: nn.Module | None, tokenizer=None, source: str | None = None, dtype=torch.float32):
        self._model = model
        self.tokenizer = tokenizer
        self.source = source  # a local safetensors folder the sequential pipeline can read block by block
        self.dtype = dtype
        self.inputs: list[Path] = []  # what the user named (folder, .gguf file): save_dir may not replace it

    @property
    def model(self) -> nn.Module:
        """The model, loaded on first use: the sequential pipeline never loads it whole."""
        if self._model is None:
            from .models import load_model

            self._model = load_model(self.source, dtype=self.dtype)
        return self._model

    @model.setter
    def model(self, value: nn.Module) -> None:
        self._model = value

    @classmethod
    def from_pretrained(cls, model_or_path=None, file_name: str | None = None, dtype=torch.float32):
        """``model_or_path``: a model object, a folder, a hub id, a ``.gguf`` file, or ``None`` (embedded).

        A local folder (the embedded model and ``.gguf`` files are converted to one, hub ids are
        downloaded to one) is opened lazily: the whole-model pipeline loads it in ``dtype``, the
        sequential one reads one block at a time in its stored dtype.
        """
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path)
        from .models import load_config, load_model_and_tokenizer, load_tokenizer, local_inputs, local_model_folder

        source = model_or_path
        if file_name is not None:
            source = str(Path(model_or_path) / file_name)
        folder = local_model_folder(source)
        if folder is None:
            model, tokenizer = load_model_and_tokenizer(source, dtype=dtype)
            compressor = cls(model, tokenizer)
        else:
            load_config(folder)  # an unknown architecture or a non-model folder fails here, not later
            compressor = cls(None, load_tokenizer(folder), source=str(folder), dtype=dtype)
        compressor.inputs = local_inputs(source)
        return compressor

    def quantize(self, save_dir, overwrite: bool = False, **kwargs):
        """Optimum's entry point: same as :meth:`compress`."""
        return self.compress(save_dir=save_dir, overwrite=overwrite, **kwargs)

    def compress(
        self,
        config: ASVDConfig | None = None,
        calibration: str | torch.Tensor | None = None,
        save_dir: str | Path | None = None,
        filter_fn: Callable[[str, nn.Module], bool] | None = None,
        progress: bool = True,
        overwrite: bool = False,
    ) -> CompressionReport:
        """Compress ``self.model`` in place; write ``save_dir`` (atomically) when given.

        ``calibration`` overrides ``config.calibration``: a source string or a ready (n, seqlen) tensor
        of token ids. ``filter_fn(name, module)`` narrows which projections are compressed.
        An existing non-empty ``save_dir`` is refused before any work unless ``overwrite`` is set and it
        holds ``asvd_report.json`` (a folder this tool wrote); the input model's folder, or one holding
        it, is refused always.
        """
        config = config or ASVDConfig()
        config.validate()
        if save_dir is not None:
            check_output_folder(save_dir, overwrite, REPORT_FILE, self.input_paths())
        pipeline, reason = self.choose_pipeline(config)
        self._pipeline = {"name": pipeline, "reason": reason}
        if progress:
            print(f"pipeline: {pipeline} ({reason})")
        if pipeline == "sequential":
            from .pipelines.run import compress_sequentially

            report = compress_sequentially(self, config, calibration, save_dir, filter_fn, progress, overwrite)
        else:
            analysis = self.analyze(config, calibration, filter_fn, progress)
            report = self.apply(analysis, config, save_dir=save_dir, progress=progress, overwrite=overwrite)
        return report

    def input_paths(self) -> list[Path]:
        """The local files and folders this compressor reads its model from: never an output."""
        from .models import local_inputs

        paths = list(self.inputs) + ([Path(self.source)] if self.source is not None else [])
        return paths + (local_inputs(self._model) if self._model is not None else [])

    def choose_pipeline(self, config: ASVDConfig) -> tuple[str, str]:
        """``(pipeline, why)``: the configured one, or for ``auto`` the rule in docs/ARCHITECTURE.md."""
        from .pipelines.memory import choose_pipeline

        return choose_pipeline(self, config)

    def analyze(self, config: ASVDConfig, calibration=None, filter_fn=None, progress: bool = True) -> Analysis:
        """Whole-model path, budget-independent half: calibration, graph, statistics, scaled SVDs."""
        from .kv import LatentKVAttention
        from .modules import LowRankLinear

        config.validate()
        model = self.model.eval()
        if any(isinstance(m, (LowRankLinear, LatentKVAttention)) for m in model.modules()):
            raise InvalidInputError("This model is already ASVD-compressed; compress the original model instead")
        if config.latent_kv:  # attention the family table does not cover is refused before any work
            from . import kv

            layouts = kv.find_attention_layers(model, "The KV pass (--kv-ratio)")
            kv.plan.check_budget(config, layouts, next(model.parameters()).element_size())
        start = time.perf_counter()
        windows = self._calibration(config, calibration, progress)
        data_seconds = time.perf_counter() - start
        source = config.calibration if calibration is None else calibration
        analysis = WholeModelPipeline(model, progress).analyze(config, windows, source, filter_fn)
        analysis.seconds = {"calibration_data": data_seconds, **analysis.seconds}
        return analysis

    def apply(self, analysis: Analysis, config: ASVDConfig, save_dir=None, progress: bool = True,
              overwrite: bool = False) -> CompressionReport:
        """Whole-model path, second half: allocate for ``config``'s budget, swap modules in, report, save."""
        model = self.model
        pipeline = WholeModelPipeline(model, progress)
        plan, kv_plan, allocate_seconds = pipeline.plan(analysis, config)
        seconds = dict(analysis.seconds, allocate=allocate_seconds)
        params_before = model_params(model)
        pipeline.apply(analysis, plan, kv_plan)
        if kv_plan is not None and kv_plan.bits is not None:
            pipeline.calibrate_kv_quantizers(analysis.windows, config, kv_plan.bits)
        seconds["compress"] = sum(seconds.values())
        model.config.quantization_config = quantization_config(
            config, plan, kv_plan, analysis.windows, analysis.calibration_source, "whole")
        report = build_report(config, plan, kv_plan, analysis.shapes, seconds, int(analysis.windows.numel()),
                              params_before, model_params(model), getattr(self, "_pipeline", None))
        if save_dir is not None:
            self.save(save_dir, config, report, overwrite)
        return report

    def save(self, save_dir, config: ASVDConfig, report: CompressionReport, overwrite: bool = False) -> None:
        """Write the model, tokenizer and side files to ``save_dir`` (rules: :meth:`compress`)."""
        if self.source is not None:
            # Loaded whole in the compute dtype (e.g. float32 for selfgen): written in the input's stored dtype.
            from .models import checkpoint_dtype

            stored = checkpoint_dtype(self.source)
            if stored is not None and stored != next(self.model.parameters()).dtype:
                self.model.to(stored)
        with atomic_directory(save_dir, overwrite, REPORT_FILE, self.input_paths()) as staging:
            self.model.save_pretrained(staging)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(staging)
            write_side_files(staging, config, report)

    def _calibration(self, config: ASVDConfig, calibration, progress: bool = False) -> torch.Tensor:
        if isinstance(calibration, torch.Tensor):
            if calibration.dim() != 2 or calibration.shape[1] < 2:
                raise InvalidInputError("calibration tensor must be (samples, seqlen) token ids")
            return calibration.long().cpu()
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and config.seqlen > limit:
            raise InvalidInputError(f"seqlen {config.seqlen} is longer than the model's {limit} positions")
        source = calibration if calibration is not None else config.calibration
        if source not in (None, "selfgen") or config.statistics:
            if self.tokenizer is None:
                raise InvalidInputError("calibration from text needs a tokenizer: use from_pretrained or pass token ids")
        if self.tokenizer is None:
            # Plain SVD needs no statistics; a tracing example of random ids is enough.
            generator = torch.Generator().manual_seed(config.seed)
            return torch.randint(0, self.model.config.vocab_size, (1, config.seqlen), generator=generator)
        return calibration_windows(source, self.model, self.tokenizer, config.calib_samples, config.seqlen, config.seed,
                                   progress)
