"""ONNX export with an explicit (latent or dense) KV cache, weight quantization, and two ``generate`` runtimes:
our own ``ORTCausalLM`` and onnxruntime-genai's (``GenAICausalLM``); ``ONNXDecoder`` steps any decoder-only ONNX folder."""

from .genai_runtime import GenAICausalLM
from .onnx_decoder import ONNXDecoder
from .onnx_export import ExportMetadata, export_onnx
from .ort_runtime import ORTCausalLM, ORTInputError

__all__ = ["ExportMetadata", "GenAICausalLM", "ONNXDecoder", "ORTCausalLM", "ORTInputError", "export_onnx"]
