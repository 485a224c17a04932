"""Weight quantization on ONNX Runtime's MatMulNBits grid: exact fake quantization and GPTQ."""

from .matmul_nbits import BlockQuantized, check_grid, from_grid, packed, quantize_rtn

__all__ = ["BlockQuantized", "check_grid", "from_grid", "packed", "quantize_rtn"]
