"""ONNX export with an explicit (latent or dense) KV cache, and an ONNX Runtime ``generate`` runtime."""

from .onnx_export import ExportMetadata, export_onnx
from .ort_runtime import ORTCausalLM, ORTInputError

__all__ = ["ExportMetadata", "ORTCausalLM", "ORTInputError", "export_onnx"]
