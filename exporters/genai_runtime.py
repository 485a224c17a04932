"""Generation through onnxruntime-genai, a runtime we did not write, over a ``--genai`` export.

onnxruntime-genai drives the exported graph itself: it builds ``attention_mask`` and
``position_ids``, allocates each step's present cache from the key inputs' fixed dims (a latent
layer: one "head" of its packed width), feeds it back as the next past, and samples. This module
only opens the folder and runs its generator loop, so that its tokens can be compared with ours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from asvd_passes.errors import InvalidInputError, MissingDependencyError, MissingFileError, UnavailableError

from .onnx_export import GENAI_CONFIG_FILE, METADATA_FILE, ExportMetadata

DEVICE_TYPES = {"cpu": "CPU", "cuda": "CUDA"}


def _genai():
    try:
        import onnxruntime_genai
    except ImportError as err:
        raise MissingDependencyError(f"--runtime genai needs onnxruntime-genai: pip install onnxruntime-genai ({err})") from err
    return onnxruntime_genai


class GenAICausalLM:
    """``onnxruntime_genai.Model`` over an export folder with ``genai_config.json``."""

    def __init__(self, folder: str | Path, provider: str = "cpu"):
        og = _genai()
        folder = Path(folder)
        if not (folder / GENAI_CONFIG_FILE).is_file():
            raise MissingFileError(
                f"{folder} has no {GENAI_CONFIG_FILE}: export it with `asvd export onnx DIR --out {folder} --genai`"
            )
        if provider not in DEVICE_TYPES:
            raise InvalidInputError(f"provider must be one of {sorted(DEVICE_TYPES)}, got {provider!r}")
        if provider == "cuda" and not og.is_cuda_available():
            raise UnavailableError("onnxruntime-genai here has no CUDA support (install onnxruntime-genai-cuda on a GPU machine)")
        self.folder = folder
        self.metadata = (ExportMetadata.from_json((folder / METADATA_FILE).read_text())
                         if (folder / METADATA_FILE).is_file() else None)
        config = og.Config(str(folder))
        config.clear_providers()
        if provider == "cuda":
            config.append_provider("cuda")
        self.model = og.Model(config)
        self._og = og

    def tokenizer(self):
        """genai's own tokenizer (reads the folder's ``tokenizer.json``)."""
        return self._og.Tokenizer(self.model)

    def generate(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False, seed: int | None = None,
                 streamer=None) -> np.ndarray:
        """(batch, prompt) token ids (no padding) → (batch, prompt + new); rows stop at EOS as genai decides."""
        ids = np.asarray(input_ids, dtype=np.int32)
        if ids.ndim == 1:
            ids = ids[None]
        params = self._og.GeneratorParams(self.model)
        options = {"max_length": ids.shape[1] + max_new_tokens, "do_sample": do_sample, "batch_size": ids.shape[0]}
        if seed is not None:
            options["random_seed"] = seed
        params.set_search_options(**options)
        generator = self._og.Generator(self.model, params)
        generator.append_tokens(ids)
        last = None
        while not generator.is_done():
            generator.generate_next_token()
            last = np.asarray(generator.get_next_tokens())
            if streamer is not None:
                streamer(last)
        rows = [np.asarray(generator.get_sequence(i), dtype=np.int64) for i in range(ids.shape[0])]
        eos = set(self.metadata.eos_token_id or []) if self.metadata else set()
        if last is not None and len(rows) == 1 and int(last[0]) in eos and rows[0][-1] != last[0]:
            # genai ends the sequence before the EOS it chose; transformers and ORTCausalLM keep it
            rows[0] = np.append(rows[0], int(last[0]))
        width = max(len(row) for row in rows)
        pad = (self.metadata.pad_token_id if self.metadata and self.metadata.pad_token_id is not None else 0)
        return np.stack([np.pad(row, (0, width - len(row)), constant_values=pad) for row in rows])

    def step_logits(self, input_ids, prefill: int) -> np.ndarray:
        """Last-token logits after a ``prefill``-token prompt, then after each following token fed one by one.

        genai appends tokens more than once only for batch 1, so rows run one after another.
        """
        rows = []
        for row in np.asarray(input_ids, dtype=np.int32):
            params = self._og.GeneratorParams(self.model)
            params.set_search_options(max_length=len(row) + 1)
            generator = self._og.Generator(self.model, params)
            generator.append_tokens(row[None, :prefill])
            logits = [np.asarray(generator.get_logits()).reshape(-1)]
            for t in range(prefill, len(row)):
                generator.append_tokens(row[None, t : t + 1])
                logits.append(np.asarray(generator.get_logits()).reshape(-1))
            rows.append(np.stack(logits))
        return np.stack(rows)
