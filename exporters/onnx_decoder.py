"""``ONNXDecoder``: any decoder-only ONNX folder with cache inputs, run step by step by ONNX Runtime.

It needs no metadata of ours, so one command measures our exports and other tools' alike (the
folders onnxruntime-genai's model builder writes, with ``GroupQueryAttention``, no ``position_ids``
input, and an int8/int4 KV cache). Everything is read from the graph itself, and from
``genai_config.json`` when the graph leaves a size symbolic:

- the model file: ``genai_config.json``'s ``model.decoder.filename``, else ``model.onnx``;
- cache inputs: every input that is not ``input_ids``, ``attention_mask`` or ``position_ids``;
  each is ``(batch, heads, past, width)`` (genai's 4-D cache) or ``(batch, past, width)`` (our
  ``asvd`` layout); a symbolic width is the config's ``head_size`` (halved, rounded up, for a
  ``uint8`` cache: the builder stores an int4 cache two values a byte);
- cache outputs: the outputs after the first (the logits), in the order of the cache inputs.

The dtype of each cache input is taken as it is declared (float, float16, int8, uint8), so the
bytes a token adds to the cache are counted as the runtime stores them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from asvd_passes.errors import InvalidInputError, MissingFileError

from .onnx_export import GENAI_CONFIG_FILE, MODEL_FILE

TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
             "tensor(uint8)": np.uint8, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class ONNXDecoder:
    """Logits and a growing cache from a decoder-only ONNX folder (ours or onnxruntime-genai's builder's)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        config = json.loads((folder / GENAI_CONFIG_FILE).read_text()) if (folder / GENAI_CONFIG_FILE).is_file() else {}
        decoder = config.get("model", {}).get("decoder", {})
        path = folder / decoder.get("filename", MODEL_FILE)
        if not path.is_file():
            raise MissingFileError(f"{folder} holds no ONNX decoder ({path.name}; {GENAI_CONFIG_FILE} names it when present)")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.folder = folder
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in inputs:
            raise InvalidInputError(f"{path} has no input_ids input: not a decoder-only language model graph")
        self.has_mask, self.has_positions = "attention_mask" in inputs, "position_ids" in inputs
        self.cache_inputs = [i for name, i in inputs.items() if name not in TOKEN_INPUTS]
        if not self.cache_inputs:
            raise InvalidInputError(f"{path} has no cache inputs (past key/value): this runner steps a cached decoder")
        self.output_names = [o.name for o in self.session.get_outputs()]
        if len(self.output_names) != 1 + len(self.cache_inputs):
            raise InvalidInputError(f"{path}: {len(self.output_names)} outputs for {len(self.cache_inputs)} cache inputs; "
                                    "expected the logits then one present entry per past entry")
        self.cache_shapes = [self._fixed_shape(i, decoder) for i in self.cache_inputs]  # None where batch/past go
        self.cache_dtypes = [ORT_TYPES[i.type] for i in self.cache_inputs]

    @staticmethod
    def _fixed_shape(entry, decoder: dict) -> list:
        shape = list(entry.shape)
        if len(shape) not in (3, 4):
            raise InvalidInputError(f"cache input {entry.name} has shape {shape}: expected (batch, [heads,] past, width)")
        shape[0] = shape[-2] = None
        if not isinstance(shape[-1], int):
            if "head_size" not in decoder:
                raise InvalidInputError(f"cache input {entry.name} has a symbolic width and no {GENAI_CONFIG_FILE} "
                                        "head_size says what it is")
            shape[-1] = (decoder["head_size"] + 1) // 2 if entry.type == "tensor(uint8)" else decoder["head_size"]
        if len(shape) == 4 and not isinstance(shape[1], int):
            shape[1] = decoder.get("num_key_value_heads")
            if shape[1] is None:
                raise InvalidInputError(f"cache input {entry.name} has symbolic heads and no num_key_value_heads")
        return shape

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros([batch if i == 0 else 0 if d is None else d for i, d in enumerate(shape)], dtype)
                for shape, dtype in zip(self.cache_shapes, self.cache_dtypes)]

    def cache_bytes_per_token(self) -> int:
        """Bytes one token adds to the cache of one sequence, every layer, as stored."""
        return sum(int(np.prod([d for d in shape if d is not None])) * np.dtype(dtype).itemsize
                   for shape, dtype in zip(self.cache_shapes, self.cache_dtypes))

    def forward(self, input_ids, past: list, position: int = 0) -> tuple[np.ndarray, list]:
        """One call: ``input_ids`` (batch, seq) after ``position`` cached tokens; (logits, present cache)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = ids.shape
        feeds = {"input_ids": ids}
        if self.has_mask:
            feeds["attention_mask"] = np.ones((batch, position + seq), dtype=np.int64)
        if self.has_positions:
            feeds["position_ids"] = np.tile(np.arange(position, position + seq, dtype=np.int64), (batch, 1))
        feeds.update({entry.name: value for entry, value in zip(self.cache_inputs, past)})
        outputs = self.session.run(self.output_names, feeds)
        return outputs[0], outputs[1:]

    def logits(self, input_ids) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        return self.forward(ids, self.empty_cache(ids.shape[0]))[0].astype(np.float32)

    def perplexity(self, source: str, seqlen: int = 512, windows: int | None = None, progress: bool = True) -> dict:
        """The protocol of ``asvd eval`` (non-overlapping windows), logits computed by ONNX Runtime."""
        import torch
        from transformers import AutoTokenizer

        from asvd_passes.evaluate import window_perplexity

        if not (self.folder / "tokenizer.json").is_file() and not (self.folder / "tokenizer_config.json").is_file():
            raise MissingFileError(f"{self.folder} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
        tokenizer = AutoTokenizer.from_pretrained(self.folder)
        result = window_perplexity(lambda window: torch.from_numpy(self.logits(window.numpy())), tokenizer, source,
                                   seqlen, windows, progress)
        return {**result, "runtime": "onnxruntime", "provider": "cpu",
                "cache_bytes_per_token": self.cache_bytes_per_token()}
