"""Text for calibration and evaluation: a local file, a Hugging Face dataset, or self-generated text."""

from __future__ import annotations

from pathlib import Path

import torch

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
def self_generated_windows(model, tokenizer, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The model samples its own calibration text from its BOS token (no data download needed)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise CalibrationError("selfgen calibration needs a tokenizer with a BOS or EOS token")
    prompt = torch.full((samples, 1), start, dtype=torch.long, device=model.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            min_new_tokens=seqlen - 1,
            max_new_tokens=seqlen - 1,
            pad_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else start,
        )
    return out[:, :seqlen].cpu()


def calibration_windows(source: str | None, model, tokenizer, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Calibration batch (samples × seqlen) from ``source``: ``None``/``selfgen``, a file or ``hf:...``."""
    if source is None or source == SELFGEN:
        return self_generated_windows(model, tokenizer, samples, seqlen, seed)
    return random_windows(tokenize(tokenizer, read_text(source)), samples, seqlen, seed, f"calibration text {source}")
