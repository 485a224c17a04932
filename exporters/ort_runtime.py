"""``ORTCausalLM``: ``generate`` over an exported model with ONNX Runtime, cache entries as graph I/O.

Each step feeds the present cache entries of the last step back as the past ones. On the CPU EP
they are NumPy arrays; on the CUDA EP (``onnxruntime-gpu`` and a GPU) the step runs with IO
binding and the outputs stay on the device as ``OrtValue``s that the next step binds as inputs, so
no cache tensor crosses to the host between tokens (only the last logits row does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from asvd_passes.errors import InvalidInputError, MissingFileError, UnavailableError

from .onnx_export import METADATA_FILE, MODEL_FILE, ExportMetadata

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
# Which execution providers have kernels for the N-bit ops that int8/int4 exports contain
# (ONNX Runtime 1.32's contrib kernels). A provider without them would silently hand those nodes
# to the CPU, or fail at session creation with an opaque message.
NBIT_KERNELS = {
    "MatMulNBits": {"cpu", "cuda", "dml"},
    "GatherBlockQuantized": {"cpu", "cuda"},
}


class ORTInputError(InvalidInputError):
    """Inputs that do not fit the exported graph (names, ranks, widths)."""


class ORTCausalLM:
    def __init__(self, folder: str | Path, provider: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        if not (folder / MODEL_FILE).is_file() or not (folder / METADATA_FILE).is_file():
            raise MissingFileError(f"{folder} is not an exported ONNX folder ({MODEL_FILE} and {METADATA_FILE})")
        if provider not in PROVIDERS:
            raise InvalidInputError(f"provider must be one of {sorted(PROVIDERS)}, got {provider!r}")
        self.metadata = ExportMetadata.from_json((folder / METADATA_FILE).read_text())
        for op in self.metadata.quantized.get("ops", {}):
            if op in NBIT_KERNELS and provider not in NBIT_KERNELS[op]:
                raise InvalidInputError(
                    f"{folder} is a {self.metadata.weights} export with {op} nodes, which ONNX Runtime's "
                    f"{PROVIDERS[provider]} has no kernel for (it runs on: {', '.join(sorted(NBIT_KERNELS[op]))}); "
                    "export with --weights fp32/fp16 for this provider"
                )
        available = ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            raise UnavailableError(
                f"ONNX Runtime provider {PROVIDERS[provider]} is not available here (available: {', '.join(available)}); "
                "install onnxruntime-gpu on a CUDA machine for --provider cuda"
            )
        self.folder = folder
        self.provider = provider
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider == "cuda" else [])
        self.session = ort.InferenceSession(str(folder / MODEL_FILE), options, providers=providers)
        names = {i.name for i in self.session.get_inputs()}
        if names != set(self.metadata.inputs):
            raise InvalidInputError(f"{folder}: graph inputs {sorted(names)} differ from its metadata")
        self.float_type = np.float16 if self.metadata.dtype == "fp16" else np.float32

    # -- one step ----------------------------------------------------------------------------------

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros(self._shape(entry, batch, 0), dtype=self.float_type if entry.dtype == "float" else entry.dtype)
                for entry in self.metadata.cache]

    def _shape(self, entry, batch: int, length: int) -> tuple[int, ...]:
        if "width" in entry.fixed:
            return (batch, length, entry.fixed["width"])
        return (batch, entry.fixed["heads"], length, entry.fixed["head_dim"])

    def check_inputs(self, feeds: dict) -> None:
        """Clear errors for a missing cache input or one of the wrong shape (before ORT sees it)."""
        missing = [name for name in self.metadata.inputs if name not in feeds]
        if missing:
            raise ORTInputError(f"missing input(s): {', '.join(missing[:4])}")
        ids = feeds["input_ids"]
        if ids.ndim != 2:
            raise ORTInputError(f"input_ids must be (batch, seq), got shape {ids.shape}")
        batch, seq = ids.shape
        if "position_ids" in feeds and feeds["position_ids"].shape != (batch, seq):
            raise ORTInputError(f"position_ids must be {(batch, seq)}, got {feeds['position_ids'].shape}")
        past = None
        for entry in self.metadata.cache:
            value = feeds[entry.input]
            shape = tuple(value.shape())  if callable(getattr(value, "shape", None)) else tuple(value.shape)
            length = shape[1] if "width" in entry.fixed else (shape[2] if len(shape) == 4 else -1)
            expected = self._shape(entry, batch, length)
            if shape != expected:
                raise ORTInputError(f"{entry.input} must have shape {expected} (batch, past, width), got {shape}")
            if past is None:
                past = length
            elif length != past:
                raise ORTInputError(f"{entry.input} has past length {length}, other cache inputs {past}")
        if feeds["attention_mask"].shape != (batch, past + seq):
            raise ORTInputError(
                f"attention_mask must be (batch, past + seq) = {(batch, past + seq)}, got {feeds['attention_mask'].shape}"
            )

    def forward(self, input_ids, attention_mask, position_ids, past: list) -> tuple[np.ndarray, list]:
        """One call of the graph: logits (batch, seq, vocab) and the present cache entries."""
        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64),
                 "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        if "position_ids" in self.metadata.inputs:  # the builder's graph derives positions from the mask
            feeds["position_ids"] = np.asarray(position_ids, dtype=np.int64)
        feeds.update({entry.input: value for entry, value in zip(self.metadata.cache, past)})
        self.check_inputs(feeds)
        if self.provider == "cuda":
            return self._forward_bound(feeds)
        outputs = self.session.run(self.metadata.outputs, feeds)
        return outputs[0], outputs[1:]

    def _forward_bound(self, feeds: dict):
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        for name in self.metadata.outputs:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), outputs[1:]  # logits to the host; the cache stays on the device

    def logits(self, input_ids) -> np.ndarray:
        """Logits of a whole sequence from an empty cache (what perplexity needs)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = ids.shape
        positions = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        logits, _ = self.forward(ids, np.ones_like(ids), positions, self.empty_cache(batch))
        return logits

    def perplexity(self, source: str, seqlen: int = 512, windows: int | None = None, progress: bool = True) -> dict:
        """WikiText-style perplexity computed by ONNX Runtime on this export (the protocol of ``asvd eval``)."""
        import torch
        from transformers import AutoTokenizer

        from asvd_passes.evaluate import window_perplexity

        if not (self.folder / "tokenizer_config.json").is_file() and not (self.folder / "tokenizer.json").is_file():
            raise MissingFileError(f"{self.folder} has no tokenizer files; export from a model folder to include them")
        tokenizer = AutoTokenizer.from_pretrained(self.folder)
        result = window_perplexity(lambda window: torch.from_numpy(self.logits(window.numpy())), tokenizer, source,
                                   seqlen, windows, progress)
        return {**result, "runtime": "onnxruntime", "provider": self.provider, "weights": self.metadata.weights}

    # -- generation --------------------------------------------------------------------------------

    def generate(
        self,
        input_ids,
        attention_mask=None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        streamer: Callable[[np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """Left-padded batch in, (batch, prompt + new) token ids out; rows stop at EOS (then pad)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if mask.shape != ids.shape:
            raise ORTInputError(f"attention_mask {mask.shape} must match input_ids {ids.shape}")
        eos = eos_token_id if eos_token_id is not None else self.metadata.eos_token_id
        eos = set([eos] if isinstance(eos, int) else (eos or []))
        pad = pad_token_id if pad_token_id is not None else (self.metadata.pad_token_id or (min(eos) if eos else 0))
        rng = np.random.default_rng(seed)
        batch = ids.shape[0]
        past = self.empty_cache(batch)
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)
        positions[mask == 0] = 1  # what transformers' generate feeds for pads (they are masked anyway)
        step_ids, sequences = ids, ids
        finished = np.zeros(batch, dtype=bool)
        for _ in range(max_new_tokens):
            logits, past = self.forward(step_ids, mask, positions, past)
            scores = logits[:, -1].astype(np.float64)
            following = self._choose(scores, do_sample, temperature, top_k, rng)
            following = np.where(finished, pad, following)
            sequences = np.concatenate([sequences, following[:, None]], axis=1)
            if streamer is not None:
                streamer(following)
            finished |= np.isin(following, list(eos))
            if finished.all():
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1
            step_ids = following[:, None]
        return sequences

    @staticmethod
    def _choose(scores: np.ndarray, do_sample: bool, temperature: float, top_k: int, rng) -> np.ndarray:
        if not do_sample:
            return scores.argmax(-1)
        scores = scores / max(temperature, 1e-6)
        if top_k:
            kth = np.sort(scores, axis=-1)[:, -top_k][:, None]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return np.array([rng.choice(probs.shape[1], p=row) for row in probs])
