"""Fake quantization bit-identical to what ONNX Runtime's quantizer writes and MatMulNBits computes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from asvd_passes.errors import InvalidInputError
from asvd_passes.quantization import check_grid, from_grid, packed, quantize_rtn
from asvd_passes.quantization.matmul_nbits import round_half_away

pytest.importorskip("onnx_ir")  # ORT's quantizer needs it


def _one_matmul(weight: torch.Tensor):
    """A one-node ``y = x·Wᵀ`` model (the weight as ONNX stores a Linear's: K × N)."""
    from onnx import TensorProto, helper, numpy_helper

    n, k = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "B"], ["y"], name="matmul")], "one_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(weight.T.contiguous().numpy(), "B")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _ort_quantized(weight: torch.Tensor, bits: int, block_size: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=bits)
    quantizer = MatMulNBitsQuantizer(_one_matmul(weight), bits=bits, block_size=block_size, is_symmetric=False,
                                     algo_config=config)
    level = logging.getLogger().level
    quantizer.process()
    logging.getLogger().setLevel(level)
    return quantizer.model.model


def _with_our_initializers(model, quantized):
    """The same MatMulNBits node reading our codes, scales and zero points instead of ORT's."""
    from onnx import numpy_helper

    node = model.graph.node[0]
    ours = {name: numpy_helper.from_array(array, name) for name, array in zip(node.input[1:], packed(quantized))}
    for index, init in enumerate(model.graph.initializer):
        if init.name in ours:
            model.graph.initializer[index].CopyFrom(ours[init.name])
    return model


def _run_identity(model, k: int) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.eye(k, dtype=np.float32)})[0]


def _awkward_weight(n: int, k: int, block_size: int, seed: int) -> torch.Tensor:
    """Rows of different scales and offsets, an all-zero block and an all-positive one (zero point at the end)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator) * torch.rand(n, 1, generator=generator) \
        + 0.3 * torch.randn(n, 1, generator=generator)
    weight[1, :block_size] = 0
    weight[2, :block_size] = weight[2, :block_size].abs()
    return weight


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block_size,k", [(16, 200), (32, 96), (64, 200), (128, 96), (32, 160)])
def test_rtn_is_bit_identical_to_ort(bits, block_size, k):
    """Our codes, scales and zero points equal the bytes ORT's quantizer writes (a short last block too),
    and MatMulNBits (accuracy level 0) on the identity returns exactly our dequantized weights."""
    weight = _awkward_weight(24, k, block_size, seed=bits * k + block_size)
    model = _ort_quantized(weight, bits, block_size)
    node = model.graph.node[0]
    assert node.op_type == "MatMulNBits"
    from onnx import numpy_helper

    theirs = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    quantized = quantize_rtn(weight, bits, block_size)
    for ours, name in zip(packed(quantized), node.input[1:]):
        np.testing.assert_array_equal(ours, theirs[name].reshape(ours.shape))
    expected = quantized.dequantize().T.numpy()
    np.testing.assert_array_equal(_run_identity(model, k), expected)
    np.testing.assert_array_equal(_run_identity(_with_our_initializers(model, quantized), k), expected)


def test_codes_are_recovered_from_a_weight_on_the_grid():
    weight = _awkward_weight(8, 64, 32, seed=1)
    quantized = quantize_rtn(weight, 4, 32)
    again = from_grid(quantized.dequantize(), quantized.scales, quantized.zero_points, 4, 32)
    assert torch.equal(again.codes, quantized.codes)
    with pytest.raises(InvalidInputError, match="no longer lies on its grid"):
        from_grid(weight, quantized.scales, quantized.zero_points, 4, 32)


def test_rounding_is_c_roundf():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 2.4999998])
    assert round_half_away(x).tolist() == [1.0, 2.0, 3.0, -1.0, -3.0, 0.0, 2.0]


@pytest.mark.parametrize("bits,block_size", [(3, 32), (4, 24), (8, 8)])
def test_unsupported_grids_are_refused(bits, block_size):
    with pytest.raises(InvalidInputError):
        check_grid(bits, block_size)


def _fractional_zero_grid(n: int, k: int, block_size: int, bits: int, seed: int) -> torch.Tensor:
    """A weight as GGUF's Q4_1 stores one: every block d·q + m with q spanning 0 … 2^bits − 1 and a minimum m
    that is no integer multiple of d (so MatMulNBits' integer zero points cannot hold it)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = -(-k // block_size)
    codes = torch.randint(0, 2**bits, (n, blocks, block_size), generator=generator).float()
    codes[..., 0], codes[..., 1] = 0, 2**bits - 1  # both ends used, as Q4_1's min/max rule gives
    d = torch.rand(n, blocks, 1, generator=generator) * 0.01 + 0.001
    m = -d * (torch.rand(n, blocks, 1, generator=generator) * 2**bits)
    return (codes * d + m).reshape(n, -1)[:, :k]


@pytest.mark.parametrize("bits,block_size,k", [(4, 32, 96), (4, 16, 200), (8, 32, 96)])
def test_block_offsets_hold_a_fractional_zero_point_grid(bits, block_size, k):
    """Block offsets reproduce a Q4_1-style weight to float rounding (integer zero points cannot), the codes
    come back from the dequantized weight, a constant block is all offset, and the bytes count the offsets."""
    weight = _fractional_zero_grid(16, k, block_size, bits, seed=bits + k)
    weight[3, :block_size] = 0.25  # a constant block: scale 0
    ours = quantize_rtn(weight, bits, block_size, offsets=True)
    integer = quantize_rtn(weight, bits, block_size)
    step = weight.abs().max() / 2**bits
    assert (ours.dequantize() - weight).abs().max() < 1e-6 * weight.abs().max()  # float rounding only
    assert (integer.dequantize() - weight).abs().max() > 0.05 * step
    assert torch.equal(ours.dequantize()[3, :block_size], weight[3, :block_size])
    again = from_grid(ours.dequantize(), ours.scales, ours.zero_points, bits, block_size, ours.offsets)
    assert torch.equal(again.codes, ours.codes) and torch.equal(again.dequantize(), ours.dequantize())
    assert ours.nbytes() == integer.nbytes() + 4 * ours.offsets.numel()


def test_block_offsets_in_ort_match_the_dequantized_weights():
    """The export's form, MatMulNBits (integer zero points) + (x · P) · Cᵀ, computes x · dequantized ᵀ in ORT."""
    import onnx

    from exporters.quantize import write_recorded_grids

    weight = _fractional_zero_grid(24, 200, 16, 4, seed=3)
    quantized = quantize_rtn(weight, 4, 16, offsets=True)
    model = _one_matmul(quantized.dequantize())
    assert write_recorded_grids(model, {"w": quantized}, accuracy_level=0) == (1, False)
    onnx.checker.check_model(model)
    assert sorted(n.op_type for n in model.graph.node) == ["Add", "MatMul", "MatMul", "MatMulNBits"]
    got, expected = _run_identity(model, 200), quantized.dequantize().T.numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
