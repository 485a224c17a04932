"""Where block weights live between uses: in memory, or in safetensors shards on disk.

The sequential pipeline asks for one decoder block at a time (``load``), and gives it back when
done (``release``). :class:`ResidentWeights` serves a model already in memory; :class:`ShardedWeights`
builds the model with empty (meta) weights and reads each block's tensors from the checkpoint
shards when asked, so at most one block is materialised at a time. Compressed blocks are written
straight to output shards by :class:`ShardWriter`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..checkpoint_keys import module_keys, saved_state_dict
from ..errors import InvalidInputError, MissingFileError

INDEX_FILE = "model.safetensors.index.json"


def _module_tensors(module: nn.Module):
    for name, tensor in list(module.named_parameters(recurse=True)) + list(module.named_buffers(recurse=True)):
        yield name, tensor


def _has_tensor(module: nn.Module, name: str) -> bool:
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = module.get_submodule(owner_name) if owner_name else module
    except AttributeError:
        return False
    return attr in owner._parameters or attr in owner._buffers


class ResidentWeights:
    """A model already in memory. On CUDA, blocks move to the GPU while in use and back after."""

    def __init__(self, model: nn.Module, device: torch.device, compute_dtype: torch.dtype | None = None):
        self.model = model
        self.device = torch.device(device)
        self.storage_device = next(model.parameters()).device
        self.compute_dtype = compute_dtype

    def prepare_rest(self, blocks_prefix: str) -> None:
        for name, module in self.model.named_children():
            module.to(self.device)
        # Blocks go back to where they were stored until they are used.
        if self.device != self.storage_device:
            self.model.get_submodule(blocks_prefix).to(self.storage_device)

    def release_rest(self, blocks_prefix: str) -> None:
        """Nothing to do: a model in memory stays whole (it is the compressor's result)."""

    def load(self, prefix: str, block: nn.Module) -> nn.Module:
        return block.to(self.device, dtype=self.compute_dtype) if self.compute_dtype else block.to(self.device)

    def release(self, prefix: str, block: nn.Module, dtype: torch.dtype) -> None:
        block.to(self.storage_device, dtype=dtype)

    def discard(self, module: nn.Module) -> None:
        """Nothing to do: the tensors are the model's own (pass 2 still reads them after pass 1)."""

    def finish(self) -> None:
        """The whole model back where it was stored (the parts outside the blocks were on the device)."""
        self.model.to(self.storage_device)


class ShardedWeights:
    """A checkpoint folder of safetensors shards, read one module at a time.

    Keys are the model's module names: checkpoint keys are renamed as ``from_pretrained`` renames them
    (``checkpoint_keys.module_keys``), and tied weights are tied as it ties them.
    """

    def __init__(self, folder: str | Path, model: nn.Module, device: torch.device, compute_dtype: torch.dtype | None = None):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.model = model
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            single = self.folder / "model.safetensors"
            if not single.is_file():
                raise MissingFileError(f"{self.folder} holds no safetensors checkpoint (model.safetensors or {INDEX_FILE})")
            with safe_open(str(single), framework="pt") as handle:
                weight_map = {key: single.name for key in handle.keys()}
        # module key -> the checkpoint key that holds it, and the file that holds that key
        self.stored_key = module_keys(model, weight_map, str(self.folder))
        self.weight_map: dict[str, str] = {key: weight_map[stored] for key, stored in self.stored_key.items()}

    def keys_under(self, prefix: str) -> list[str]:
        return [key for key in self.weight_map if key == prefix or key.startswith(prefix + ".")]

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.weight_map[key], []).append(key)
        tensors = {}
        for file, names in by_file.items():
            with safe_open(str(self.folder / file), framework="pt") as handle:
                for key in names:
                    tensors[key] = handle.get_tensor(self.stored_key[key])
        return tensors

    def _materialise(self, module: nn.Module, prefix: str, dtype: torch.dtype | None) -> None:
        from accelerate.utils import set_module_tensor_to_device

        stored = self.read(self.keys_under(prefix) if prefix else list(self.weight_map))
        strip = len(prefix) + 1 if prefix else 0
        for key, value in stored.items():
            name = key[strip:]
            if not _has_tensor(module, name):
                continue  # a key this model does not use (e.g. a tied duplicate); from_pretrained ignores it too
            # accelerate casts to the (meta) parameter's dtype unless told otherwise.
            set_module_tensor_to_device(module, name, self.device, value=value, dtype=dtype or value.dtype)
        # Buffers not in the checkpoint (non-persistent: rotary tables) were built on the CPU at init.
        for name, buffer in list(module.named_buffers()):
            if buffer.device.type != "meta" and buffer.device != self.device:
                set_module_tensor_to_device(module, name, self.device, value=buffer)
        missing = [name for name, tensor in _module_tensors(module) if tensor.device.type == "meta"]
        if missing:
            raise InvalidInputError(f"{self.folder}: the checkpoint has no tensor for {prefix + '.' if prefix else ''}{missing[0]}")

    def prepare_rest(self, blocks_prefix: str) -> None:
        """Materialise everything outside the decoder blocks (embeddings, final norm, LM head)."""
        from accelerate.utils import set_module_tensor_to_device

        outside = [key for key in self.weight_map if not key.startswith(blocks_prefix + ".")]
        for key, value in self.read(outside).items():
            if not _has_tensor(self.model, key):
                continue
            set_module_tensor_to_device(self.model, key, self.device, value=value)
        # Tied as from_pretrained ties: symmetrically, so a checkpoint holding only the head still loads.
        missing = {key for key in self.model.state_dict() if key not in self.weight_map}
        self.model.tie_weights(missing_keys=missing, recompute_mapping=False)
        for name, buffer in list(self.model.named_buffers()):
            if not name.startswith(blocks_prefix + ".") and buffer.device.type != "meta" and buffer.device != self.device:
                set_module_tensor_to_device(self.model, name, self.device, value=buffer)
        blocks = self.model.get_submodule(blocks_prefix)
        for name, tensor in _module_tensors(self.model):
            if tensor.device.type == "meta" and not name.startswith(blocks_prefix + "."):
                raise InvalidInputError(f"{self.folder}: the checkpoint has no tensor for {name}")
        del blocks

    def rest_state_dict(self, blocks_prefix: str) -> dict[str, torch.Tensor]:
        """Everything outside the blocks, re-read from the shards, without tied duplicates (as
        ``save_pretrained`` drops them: the tied source is kept)."""
        outside = [key for key in self.weight_map if not key.startswith(blocks_prefix + ".")]
        tensors = self.read(outside)
        for target, source in getattr(self.model, "all_tied_weights_keys", {}).items():
            if target in tensors and source in tensors:
                del tensors[target]
        return tensors

    def release_rest(self, blocks_prefix: str) -> None:
        """Parameters outside the blocks back to meta once nothing runs them (embeddings and LM head: 2 ×
        vocab × hidden, 0.5 GiB in bf16 at a 32k vocab and width 4096); the writer re-reads them from the shards."""
        from accelerate.utils import set_module_tensor_to_device

        for name, parameter in list(self.model.named_parameters(remove_duplicate=False)):
            if name.startswith(blocks_prefix + ".") or parameter.device.type == "meta":
                continue
            try:
                parameter.untyped_storage().resize_(0)
            except RuntimeError:
                pass  # file-backed (mmapped): the page cache holds it, not us
            set_module_tensor_to_device(self.model, name, "meta")
        # Each name got its own meta tensor: tie them again, or a tied head counts twice in the report.
        self.model.tie_weights(recompute_mapping=False)

    def load(self, prefix: str, block: nn.Module) -> nn.Module:
        self._materialise(block, prefix, self.compute_dtype)
        return block

    def release(self, prefix: str, block: nn.Module, dtype: torch.dtype) -> None:
        """Parameters go back to the meta device; buffers (not in the checkpoint) stay for the next load."""
        from accelerate.utils import set_module_tensor_to_device

        for name, parameter in list(block.named_parameters()):
            if parameter.device.type == "meta":
                continue  # discarded already
            # Free the storage itself: any reference left elsewhere (a captured graph) then holds nothing.
            try:
                parameter.untyped_storage().resize_(0)
            except RuntimeError:
                pass  # a file-backed (mmapped) tensor read as stored: the page cache holds it, not us
            set_module_tensor_to_device(block, name, "meta")

    def discard(self, module: nn.Module) -> None:
        """Free one module's tensors before its block is released (a projection already factored): the
        shards still hold them, so a later pass reads them again."""
        self.release("", module, torch.float32)

    def finish(self) -> None:
        pass


class ShardWriter:
    """Write a model's tensors as they are finished: one shard per block plus one for the rest.

    Tensors come in under module names and are written under the keys ``save_pretrained`` writes
    for ``model`` (transformers reverts its load-time renamings), so the folder matches one that
    ``save_pretrained`` wrote and reloads with ``from_pretrained``.
    """

    def __init__(self, folder: str | Path, model: nn.Module):
        self.folder = Path(folder)
        self.model = model
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._count = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        self._count += 1
        name = f"model-{self._count:05d}.safetensors"
        tensors = saved_state_dict(self.model, tensors)
        contiguous = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
        save_file(contiguous, str(self.folder / name), metadata={"format": "pt"})
        for key, value in contiguous.items():
            self.weight_map[key] = name
            self.total_size += value.numel() * value.element_size()

    def finish(self) -> None:
        """Rename shards to transformers' ``-of-N`` pattern and write the index."""
        total = self._count
        renamed = {}
        for i in range(1, total + 1):
            old = f"model-{i:05d}.safetensors"
            new = f"model-{i:05d}-of-{total:05d}.safetensors"
            (self.folder / old).rename(self.folder / new)
            renamed[old] = new
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": {key: renamed[file] for key, file in sorted(self.weight_map.items())},
        }
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
