"""Transformers integration: ``from_pretrained`` rebuilds ASVD-factored models with no remote code.

A compressed folder's ``config.json`` carries ``quantization_config = {"quant_method": "asvd",
"ranks": {...}}``. Importing :mod:`asvd_passes` registers :class:`ASVDHfQuantizer` for that method;
before the weights load it swaps every listed projection for an empty ``LowRankLinear`` of the
saved rank, after checking the safetensors headers hold exactly the factor tensors it needs.
"""

from __future__ import annotations

from pathlib import Path

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import InvalidInputError
from .modules import interpolative_form, projection_shape, replace_with_empty_lowrank

QUANT_METHOD = "asvd"


class CorruptCompressedModelError(InvalidInputError):
    """A saved ASVD folder whose factor weights are missing or do not match its config."""


class ASVDQuantizationConfig(QuantizationConfigMixin):
    """What ``config.json`` records of an ASVD compression: the ranks, and how they were made."""

    def __init__(self, ranks: dict[str, int] | None = None, method: str | None = None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.ranks = {name: int(rank) for name, rank in (ranks or {}).items()}
        self.method = method
        for key, value in kwargs.items():  # provenance: ratio, alpha, calibration, seed...
            setattr(self, key, value)
        self.quant_method = QUANT_METHOD

    def to_dict(self):
        return dict(self.__dict__)


class ASVDHfQuantizer(HfQuantizer):
    """Loads folders written by ``ASVDCompressor``; it never compresses on the fly."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        ranks = self.quantization_config.ranks
        kv_data = getattr(self.quantization_config, "kv", None)
        layouts = kv_plan = kv_bits = None
        if kv_data:
            from . import kv

            layouts = kv.find_attention_layers(model, "Loading a latent-KV model")  # unsupported: its own error
            try:
                kv_plan = kv.KVPlan.from_dict(kv_data, layouts)
                kv_bits = (getattr(self.quantization_config, "kv_quant", None) or {}).get("bits")
                if kv_bits is not None:
                    kv.quant.check_bits(kv_bits)
            except (KeyError, TypeError, ValueError) as err:
                raise CorruptCompressedModelError(f"The saved latent-KV plan does not fit this model: {err}") from err
        if checkpoint_files:
            extra = {}
            if kv_plan is not None:
                try:
                    extra = kv.expected_kv_shapes(model, layouts, kv_plan, quantized=kv_bits is not None)
                except ValueError as err:
                    raise CorruptCompressedModelError(str(err)) from err
            check_checkpoint(model, ranks, checkpoint_files, extra, self.interpolative)
        # K/V first: the latent attention adopts the dense q/o projections, which the ranks may then factor.
        if kv_plan is not None:
            kv.replace_with_empty_latent(model, layouts, kv_plan)
            if kv_bits is not None:
                kv.quant.install_empty_quantizers((model.get_submodule(name) for name in kv_plan.ranks), kv_bits)
        replace_with_empty_lowrank(model, ranks, self.interpolative)
        return model

    @property
    def interpolative(self) -> bool:
        """Folders written before the interpolative form existed record no form: they hold pairs."""
        return getattr(self.quantization_config, "lowrank_form", "pair") == "interpolative"

    def is_serializable(self, **kwargs):
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def expected_factor_shapes(model, ranks: dict[str, int], interpolative: bool = False) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, rank in ranks.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError as err:
            raise CorruptCompressedModelError(f"ASVD config names {name!r}, which this model does not have") from err
        out_features, in_features = projection_shape(dense)
        shapes[f"{name}.down.weight"] = (rank, in_features)
        has_bias = getattr(dense, "bias", None) is not None
        if interpolative_form(rank, out_features, interpolative):
            shapes[f"{name}.up.weight"] = (out_features - rank, rank)
            shapes[f"{name}.rows"] = (out_features,)
            if has_bias:
                shapes[f"{name}.bias"] = (out_features,)
        else:
            shapes[f"{name}.up.weight"] = (out_features, rank)
            if has_bias:
                shapes[f"{name}.up.bias"] = (out_features,)
    return shapes


def check_checkpoint(model, ranks: dict[str, int], checkpoint_files, extra: dict | None = None,
                     interpolative: bool = False) -> None:
    """Raise :class:`CorruptCompressedModelError` unless the files hold every factor, at its shape."""
    from safetensors import safe_open

    stored: dict[str, tuple[int, ...]] = {}
    for file in checkpoint_files:
        if not str(file).endswith(".safetensors"):
            raise CorruptCompressedModelError(f"{file}: ASVD models load from safetensors only (no pickle)")
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    stored[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as err:  # safetensors raises its own error types for a damaged header
            raise CorruptCompressedModelError(f"{file} is not a readable safetensors file: {err}") from err
    folder = Path(checkpoint_files[0]).parent
    expected = expected_factor_shapes(model, ranks, interpolative)
    expected.update(extra or {})
    missing = sorted(key for key in expected if key not in stored)
    wrong = sorted(
        f"{key}: saved {stored[key]}, config says {shape}"
        for key, shape in expected.items()
        if key in stored and stored[key] != shape
    )
    if missing or wrong:
        details = (["missing: " + ", ".join(missing[:5])] if missing else []) + (
            ["mismatched: " + "; ".join(wrong[:5])] if wrong else []
        )
        raise CorruptCompressedModelError(
            f"Compressed model at {folder} does not match its ASVD config ({len(missing)} factor tensors missing, "
            f"{len(wrong)} of the wrong shape): " + " | ".join(details)
        )


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(ASVDQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(ASVDHfQuantizer)


register()
