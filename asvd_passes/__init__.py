"""asvd-passes: activation-aware SVD compression of causal LMs through graph passes."""

from . import hf_quantizer as _hf_quantizer  # noqa: F401  (registers "asvd" with transformers)
from .compressor import ASVDCompressor, CompressionReport, NoProjectionsError
from .families import UnsupportedModelError, decoder_blocks
from .config import ASVDConfig
from .data import CalibrationError
from .evaluate import perplexity
from .graph import NonFiniteActivationError, TraceError
from .hf_quantizer import ASVDQuantizationConfig, CorruptCompressedModelError
from .modules import LowRankLinear

__all__ = [
    "ASVDCompressor",
    "ASVDConfig",
    "ASVDQuantizationConfig",
    "CalibrationError",
    "CompressionReport",
    "CorruptCompressedModelError",
    "LowRankLinear",
    "NoProjectionsError",
    "UnsupportedModelError",
    "decoder_blocks",
    "NonFiniteActivationError",
    "TraceError",
    "perplexity",
]
__version__ = "0.1.0"
