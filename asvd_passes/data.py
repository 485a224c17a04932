"""Text for calibration and evaluation: a local file, a Hugging Face dataset, or self-generated text."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .errors import InvalidInputError

SELFGEN = "selfgen"


class CalibrationError(InvalidInputError):
    """The calibration source cannot provide the requested windows."""


def read_text(source: str) -> str:
    """Text of a local file or of ``hf:NAME[:CONFIG[:SPLIT]]`` (rows joined with blank lines)."""
    if source.startswith("hf:"):
        parts = source[3:].split(":")
        name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
        split = parts[2] if len(parts) > 2 else "train"
        try:
            import datasets
        except ImportError as err:  # optional: only users who name a hub dataset need it
            raise CalibrationError("hf: calibration needs the 'datasets' package (pip install datasets)") from err
        rows = datasets.load_dataset(name, config, split=split)
        column = "text" if "text" in rows.column_names else rows.column_names[0]
        return "\n\n".join(rows[column])
    path = Path(source)
    if not path.is_file():
        raise CalibrationError(f"Calibration/evaluation text file not found: {path}")
    return path.read_text(encoding="utf-8")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D tensor of token ids (no special tokens added, as in the evaluation protocol)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def random_windows(tokens: torch.Tensor, samples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens at seeded random offsets: (samples, seqlen)."""
    if tokens.numel() < seqlen + 1:
        raise CalibrationError(
            f"{what} has {tokens.numel()} tokens, fewer than one window of seqlen={seqlen} (+1); "
            "give more text or a smaller --seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (samples,), generator=generator)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


@torch.no_grad()
def self_generated_windows(model, tokenizer, samples: int, seqlen: int, seed: int, progress: bool = False) -> torch.Tensor:
    """The model samples its own calibration text from its BOS token (no data download needed).

    Plain sampling (temperature 1, no top-k/p), EOS suppressed so every window is ``seqlen`` tokens.
    A decode loop of our own rather than ``generate``: on a 2-core CPU ``generate``'s
    ``torch.multinomial`` and its cache's per-step ``torch.cat`` (a copy of the whole cache per layer
    and step) were 14 s of SmolLM2's 52; inverse-CDF sampling and a preallocated cache take 38 s.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise CalibrationError("selfgen calibration needs a tokenizer with a BOS or EOS token")
    banned = _eos_ids(model, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    cache = DynamicCache(config=model.config)
    # Only plain full-attention layers are swapped; sliding-window and other layers keep their own logic.
    cache.layers = [_PreallocatedLayer(seqlen) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    accepted = inspect.signature(model.forward).parameters
    # transformers 5.25 renames ``past_key_values`` to ``cache`` (the old name warns until 5.40).
    step = {"cache" if "cache" in accepted else "past_key_values": cache, "use_cache": True}
    if "logits_to_keep" in accepted:
        step["logits_to_keep"] = 1
    ids = torch.full((samples, 1), start, dtype=torch.long, device=model.device)
    tokens = [ids.cpu()]
    for _ in tqdm(range(seqlen - 1), desc="selfgen calibration", disable=not progress):
        logits = model(input_ids=ids, **step).logits[:, -1].float()
        logits[:, banned] = float("-inf")
        ids = sample_tokens(logits.cpu(), generator).to(model.device)
        tokens.append(ids.cpu())
    return torch.cat(tokens, dim=1)


def sample_tokens(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row drawn from softmax(logits) by inverse CDF: (rows, 1).

    Exact up to float rounding: token i is drawn when cdf[i-1] <= u < cdf[i], u uniform on [0, cdf[-1]);
    ``right=True`` never returns a zero-probability token. One uniform per row instead of
    ``torch.multinomial``'s one exponential per vocabulary entry.
    """
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1)


def _eos_ids(model, tokenizer) -> list[int]:
    """The ids ``generate`` would stop at (generation config and tokenizer), suppressed while sampling."""
    ids = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    return sorted(i for i in ids if 0 <= i < vocab)


class _PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer writing into buffers of the final length and returning views of
    what is filled: the same keys and values as ``DynamicLayer`` without its per-step ``torch.cat``."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        shape = (*key_states.shape[:2], self.capacity)
        self._keys = key_states.new_empty(*shape, key_states.shape[-1])
        self._values = value_states.new_empty(*shape, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        stop = self.length + key_states.shape[-2]
        if stop > self.capacity:
            raise RuntimeError(f"cache capacity {self.capacity} exceeded")
        self._keys[:, :, self.length : stop] = key_states
        self._values[:, :, self.length : stop] = value_states
        self.length = stop
        self.keys, self.values = self._keys[:, :, :stop], self._values[:, :, :stop]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def calibration_windows(source: str | None, model, tokenizer, samples: int, seqlen: int, seed: int,
                        progress: bool = False) -> torch.Tensor:
    """Calibration batch (samples × seqlen) from ``source``: ``None``/``selfgen``, a file or ``hf:...``."""
    if source is None or source == SELFGEN:
        return self_generated_windows(model, tokenizer, samples, seqlen, seed, progress)
    return random_windows(tokenize(tokenizer, read_text(source)), samples, seqlen, seed, f"calibration text {source}")
