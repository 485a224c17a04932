"""asvd-passes: activation-aware SVD compression of causal LMs, calibrated through torch.export graph passes."""

from . import hf_quantizer as _hf_quantizer  # noqa: F401  (registers "asvd" with transformers)
from .compressor import ASVDCompressor, CompressionReport, NoProjectionsError
from .families import UnsupportedModelError, decoder_blocks
from .config import ASVDConfig
from .data import CalibrationError
from .errors import (ASVDError, InvalidInputError, MissingDependencyError, MissingFileError, OutputExistsError,
                     UnavailableError)
from .evaluate import perplexity
from .graph import NonFiniteActivationError, TraceError
from .hf_quantizer import ASVDQuantizationConfig, CorruptCompressedModelError
from .modules import LowRankLinear

__all__ = [
    "ASVDCompressor",
    "ASVDConfig",
    "ASVDError",
    "ASVDQuantizationConfig",
    "CalibrationError",
    "CompressionReport",
    "CorruptCompressedModelError",
    "InvalidInputError",
    "LowRankLinear",
    "MissingDependencyError",
    "MissingFileError",
    "NoProjectionsError",
    "UnsupportedModelError",
    "decoder_blocks",
    "NonFiniteActivationError",
    "OutputExistsError",
    "TraceError",
    "UnavailableError",
    "perplexity",
]
__version__ = "0.1.0"
