"""Checkpoint keys ↔ module names, as transformers maps them in ``from_pretrained`` / ``save_pretrained``.

transformers 5 renames some families' checkpoint keys on load (GPT-NeoX stores ``embed_out.*`` for
the module ``lm_head``) and reverts the renaming on save. Whatever reads or writes safetensors
shards itself (the offloaded sequential pipeline, the quantizer's checkpoint check) goes through
these two functions, which call transformers' own conversion mapping: no private table.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import InvalidInputError


class UnsupportedCheckpointError(InvalidInputError):
    """The checkpoint needs a tensor conversion (not a renaming) that only a whole-model load performs."""


def module_keys(model: nn.Module, checkpoint_keys, source: str = "the checkpoint") -> dict[str, str]:
    """``{module key: checkpoint key}`` for every checkpoint key ``model`` holds, renamed as ``from_pretrained``
    renames it; keys the model does not hold (unexpected keys) are left out, as ``from_pretrained`` ignores them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)
    expected = model.state_dict()
    found: dict[str, str] = {}
    for key in checkpoint_keys:
        renamed, converter = rename_source_key(key, renamings, converters, prefix, expected)
        if renamed not in expected and key in expected:  # as from_pretrained: a key already in module form stays
            renamed, converter = rename_source_key(key, [], [], prefix, expected)
        if converter is not None:
            raise UnsupportedCheckpointError(
                f"{source} stores {key} in a layout transformers converts on load ({converter}); the block-by-block "
                "reader only follows renamings: compress it with --pipeline whole, or re-save it with save_pretrained")
        if renamed in expected:
            found[renamed] = key
    return found


def saved_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` (module names) under the keys ``save_pretrained`` would write for ``model``."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(state_dict))
