"""``asvd`` command line: ``compress``, ``eval``, ``inspect``, ``export onnx`` and ``generate``."""

from __future__ import annotations

import argparse
import json
import sys

from .config import DEFAULT_PARAM_RATIO, DEFAULT_STRS_CANDIDATES
from .errors import ASVDError, InvalidInputError, MissingFileError

DEFAULT_METHOD = "whiten"
DEFAULT_ALLOCATION = "fisher"


class HelpAllAction(argparse.Action):
    """``--help-all``: the help with the groups that ``--help`` hides (their options work either way)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None, hidden=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)
        self.hidden = hidden  # [(group, description, [(action, help)])], filled by add_compress_arguments

    def __call__(self, parser, namespace, values, option_string=None):
        for group, description, actions in self.hidden:
            group.description = description
            for action, text in actions:
                action.help = text
        parser.print_help()
        parser.exit()


def add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    """``asvd compress`` options (also ``optimum-cli asvd compress``): the everyday ones in ``--help``,
    ASVD-paper reproduction and fine control in ``--help-all``."""
    parser.add_argument("model", nargs="?", default=None, help="folder, hub id or .gguf file (default: embedded SmolLM2-135M)")
    target = parser.add_argument_group("what to compress")
    target.add_argument("--out", required=True, help="output folder: new or empty (written atomically)")
    target.add_argument("--overwrite", action="store_true", help="replace an existing output folder that asvd wrote")
    target.add_argument("--param-ratio", type=float, default=None,
                        help=f"kept/original parameters, in (0, 1] (default {DEFAULT_PARAM_RATIO}, or none with "
                             "--kv-ratio, --ranks or --ppl-target: those alone leave the other weights dense)")
    target.add_argument("--kv-ratio", type=float, default=None,
                        help="latent KV cache: cached latent width / dense K+V width, in (0, 1]")
    target.add_argument("--kv-bits", type=int, choices=[8, 4], default=None,
                        help="store the latent cache as 8- or 4-bit codes with static scales calibrated on the "
                             "calibration windows (default: float; needs --kv-ratio, 1.0 keeps the full width)")
    target.add_argument("--weights", choices=["int4", "int8"], default=None,
                        help="then GPTQ every Linear and the LM head onto ONNX Runtime's MatMulNBits grid (asvd quantize; "
                             "export with asvd export onnx OUT --weights int4|int8)")
    calibration = parser.add_argument_group("calibration")
    calibration.add_argument("--calib", default="selfgen", help="FILE | hf:NAME[:CONFIG[:SPLIT]] | selfgen (default)")
    calibration.add_argument("--calib-samples", type=int, default=16, help="calibration windows (default 16)")
    calibration.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    run = parser.add_argument_group("run")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where blocks are computed")
    run.add_argument("--max-memory", type=float, default=None, metavar="GiB",
                     help="memory the run may use (RAM on CPU, GPU memory on CUDA); default: what is free")
    run.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                     help="dtype a model loaded whole (whole pipeline, selfgen calibration) is loaded and computed in; "
                          "the output keeps the input checkpoint's dtype")

    hidden = []  # (group, description, [(action, help)]): shown by --help-all only

    def hidden_group(title: str, description: str):
        group = parser.add_argument_group(title)
        hidden.append((group, description, []))

        def add(*flags, help=None, **options):
            action = group.add_argument(*flags, help=argparse.SUPPRESS, **options)
            hidden[-1][2].append((action, help))
        return add

    paper = hidden_group("ASVD paper reproduction",
                         "the papers' methods and ASVD's STRS search (defaults: whiten + fisher, which measured better)")
    paper("--method", choices=["svd", "asvd", "whiten"], default=DEFAULT_METHOD,
          help="scaling S of W·S: identity (svd), diag(stat|x|^alpha) (asvd) or Cholesky of XᵀX (whiten, default)")
    paper("--alpha", type=float, default=0.5, help="ASVD exponent (method asvd)")
    paper("--asvd-statistic", choices=["abs_mean", "abs_max"], default="abs_mean", help="ASVD statistic (method asvd)")
    paper("--allocation", choices=["uniform", "strs", "fisher"], default=DEFAULT_ALLOCATION,
          help="rank allocation under the budget (default: fisher)")
    paper("--ppl-target", type=float, default=None,
          help="with --allocation strs: smallest model whose per-projection probes stay under this perplexity")
    paper("--strs-candidates", type=_ratios, default=list(DEFAULT_STRS_CANDIDATES), metavar="R,R,...",
          help=f"with --allocation strs: candidate per-projection ratios (default {','.join(map(str, DEFAULT_STRS_CANDIDATES))})")
    advanced = hidden_group("advanced", "finer control of ranks, K/V, storage and the pipeline")
    advanced("--kv-group-size", type=int, default=None, help="KV heads per latent group (default: one latent for all KV heads)")
    advanced("--kv-allocation", choices=["uniform", "fisher"], default="fisher", help="per-layer K/V latent ranks (default: fisher)")
    advanced("--kv-budget", type=float, default=None, metavar="BYTES_PER_TOKEN",
             help="latent KV cache of at most this many bytes per token: ranks per layer and the "
                  "storage (float, 8 or 4 bits) chosen together by predicted loss (instead of "
                  "--kv-ratio/--kv-bits)")
    advanced("--kv-quant-granularity", choices=["channel", "tensor"], default="channel",
             help="with --kv-bits: a scale per latent channel (default) or one per layer and K/V")
    advanced("--kv-quant-rotate", action="store_true",
             help="with --kv-bits: turn each latent by a random orthogonal matrix folded into its factors first")
    advanced("--seed", type=int, default=0, help="seed of the calibration sample (selfgen text, window choice)")
    advanced("--rank-multiple", type=int, default=1, help="round ranks down to a multiple (e.g. 8)")
    advanced("--sensitivity-samples", type=int, default=4, help="calibration windows for sensitivities")
    advanced("--ranks", default=None, help="JSON file with an explicit {module_name: rank} map")
    advanced("--include-lm-head", action="store_true", help="also compress the LM head")
    advanced("--lowrank-form", choices=["pair", "interpolative"], default="pair",
             help="storage of each factored projection: pair (two factors, r·(in+out) parameters; the default) or "
                  "interpolative (r rows of the matrix plus combinations of them, r·(in+out−r): a higher rank for "
                  "the budget, but int4 exports are refused; see docs/BENCHMARKS.md)")
    advanced("--pipeline", choices=["auto", "whole", "sequential"], default="auto",
             help="whole model at once, one decoder block at a time, or auto (printed and recorded in the report)")
    advanced("--block-size", type=int, default=32, help="with --weights: weights per quantization block (default 32)")
    advanced("--offload-folder", default=None, help="where per-block activations wait between passes")
    advanced("--no-sequential-calibration", dest="sequential_calibration", action="store_false",
             help="observe every block on the dense model's hidden states (sequential pipeline)")
    parser.add_argument("--help-all", action=HelpAllAction, hidden=hidden,
                        help="show the ASVD-paper reproduction and advanced options too")


def _ratios(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated ratios, got {text!r}") from err


def compress_config(args: argparse.Namespace):
    """The ``ASVDConfig`` of ``asvd compress`` arguments; an absent ``--param-ratio`` is the config's default rule."""
    from .config import ASVDConfig

    ranks = None
    if args.ranks:
        try:
            with open(args.ranks, encoding="utf-8") as handle:
                ranks = json.load(handle)
        except FileNotFoundError as err:
            raise MissingFileError(f"--ranks file not found: {args.ranks}") from err
        except json.JSONDecodeError as err:
            raise InvalidInputError(f"--ranks {args.ranks} is not a JSON {{module_name: rank}} map: {err}") from err
    return ASVDConfig(
        method=args.method,
        param_ratio=args.param_ratio,
        kv_ratio=args.kv_ratio,
        kv_group_size=args.kv_group_size,
        kv_allocation=args.kv_allocation,
        kv_bits=args.kv_bits,
        kv_budget=args.kv_budget,
        kv_quant_granularity=args.kv_quant_granularity,
        kv_quant_rotate=args.kv_quant_rotate,
        allocation=args.allocation,
        ppl_target=args.ppl_target,
        rank_multiple=args.rank_multiple,
        sensitivity_samples=args.sensitivity_samples,
        ranks=ranks,
        alpha=args.alpha,
        asvd_statistic=args.asvd_statistic,
        include_lm_head=args.include_lm_head,
        calibration=args.calib,
        calib_samples=args.calib_samples,
        seqlen=args.seqlen,
        seed=args.seed,
        pipeline=args.pipeline,
        device=args.device,
        max_memory=args.max_memory,
        offload_folder=args.offload_folder,
        sequential_calibration=args.sequential_calibration,
        lowrank_form=args.lowrank_form,
        strs_candidates=args.strs_candidates,
    )


def run_compress(args: argparse.Namespace) -> int:
    import torch

    from .compressor import REPORT_FILE, ASVDCompressor
    from .models import local_inputs
    from .serialization import check_output_folder

    config = compress_config(args)
    # Before a hub download or a GGUF conversion; compress() checks again with what it loaded.
    check_output_folder(args.out, args.overwrite, REPORT_FILE, local_inputs(args.model))
    weights = getattr(args, "weights", None)
    if weights:
        from .quantization import check_grid

        check_grid(int(weights[3:]), args.block_size)
    compressor = ASVDCompressor.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    if weights:  # compressed beside the output, then quantized into it (calibrated again, block by block)
        import tempfile
        from pathlib import Path

        Path(args.out).resolve().parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".asvd-compressed-", dir=Path(args.out).resolve().parent) as staging:
            report = compressor.compress(config, save_dir=Path(staging) / "model", overwrite=True)
            del compressor
            quantize_folder(Path(staging) / "model", args.out, weights, args.block_size, "gptq", 0.01,
                            args.calib, args.calib_samples, args.seqlen, args.seed, args.overwrite)
        _print_compress_report(report, args.out)
        return 0
    report = compressor.compress(config, save_dir=args.out, overwrite=args.overwrite)
    _print_compress_report(report, args.out)
    return 0


def _print_compress_report(report, out) -> None:
    if report.ranks:
        print(rank_summary(report.ranks))
    if report.kv is not None:
        print(kv_summary(report.kv))
    print(report.summary())
    print(f"saved to {out}")


def rank_summary(ranks: dict, model=None) -> str:
    """One line per decoder block: the rank of each projection (``-`` = dense)."""
    from .plots import split_block

    lines: dict[str, list[str]] = {}
    for name, rank in ranks.items():
        block, leaf = split_block(name)
        lines.setdefault(block, []).append(f"{leaf}={'-' if rank is None else rank}")
    return "\n".join(f"{block:24s} " + " ".join(items) for block, items in lines.items())


def kv_summary(kv: dict) -> str:
    """One line per attention layer: the K and V latent ranks (per head group)."""
    from .plots import split_block

    lines = []
    for name, roles in kv["layers"].items():
        block, _ = split_block(name + ".x")
        lines.append(f"{block:24s} K={'+'.join(map(str, roles['key']))} V={'+'.join(map(str, roles['value']))}")
    if kv.get("bits") is not None:
        lines.append(f"latent cache stored as {kv['bits']}-bit codes (static scales)")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    import torch

    from .inspect_model import inspect_model
    from .models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype))
    info = inspect_model(model, args.model)
    if args.json:
        print(json.dumps(info))
    else:
        kv_ratio = f"{info['kv_ratio']:.4f}" if info["kv_ratio"] is not None else "unknown (attention family not in the table)"
        print(f"param ratio {info['param_ratio']}, KV ratio {kv_ratio}: "
              f"{info['kv_bytes_per_token']} cache bytes per token (dense {info['dense_kv_bytes_per_token']})")
    return 0


def quantize_folder(model, out, weights: str, block_size: int, algorithm: str, damping: float, calib, calib_samples: int,
                    seqlen: int, seed: int, overwrite: bool, clip: bool = True, offsets: bool = False,
                    budget_mib: float | None = None, progress: bool = True) -> None:
    """``asvd quantize``: load ``model``, quantize it block by block, write ``out`` with the sidecar."""
    import time

    from .data import calibration_windows
    from .models import load_model_and_tokenizer, local_inputs
    from .quantization import check_grid
    from .quantization.calibrate import output_marker, quantize_model, save_quantized
    from .serialization import check_output_folder

    bits = int(weights[3:])
    check_grid(bits, block_size)
    inputs = local_inputs(model)
    marker = output_marker(model)
    check_output_folder(out, overwrite, marker, inputs)  # before loading and calibrating
    loaded, tokenizer = load_model_and_tokenizer(model)
    plan, planned = None, None
    if budget_mib is not None:  # every grid chosen under one byte budget; an impossible budget fails here
        from torch import nn

        from .graph.match import output_projection_name
        from .quantization.plan import budget_plan, check_budget, fixed_bytes, planned_shapes, MIB

        head_name = output_projection_name(loaded) if type(loaded.get_output_embeddings()) is nn.Linear else None
        check_budget(int(budget_mib * MIB), planned_shapes(loaded, head_name), fixed_bytes(loaded, head_name),
                     head_name)
    windows = calibration_windows(calib, loaded, tokenizer, calib_samples, seqlen, seed, progress)
    tick = time.perf_counter()
    if budget_mib is not None:
        plan, planned = budget_plan(loaded, windows[:4], budget_mib, head_name, progress=progress)
        print(f"budget {budget_mib} MiB: " + ", ".join(f"{count} × {grid}" for grid, count in planned["choices"].items())
              + (f", LM head {planned['head']}" if planned["head"] else "") + f"; predicted weights {planned['predicted_weight_bytes'] / MIB:.2f} MiB")
    grids = quantize_model(loaded, windows, bits, block_size, algorithm=algorithm, damping=damping, clip=clip,
                           offsets=offsets, choices=plan, progress=progress)
    seconds = time.perf_counter() - tick
    settings = {"weights": weights, "block_size": block_size, "algorithm": algorithm, "damping": damping, "clip": clip,
                "block_offsets": offsets, "budget": planned,
                "calibration": calib or "selfgen", "calib_samples": calib_samples, "seqlen": seqlen, "seed": seed,
                "matrices": len(grids), "seconds": round(seconds, 1)}
    save_quantized(loaded, tokenizer, grids, out, source=model, settings=settings, overwrite=overwrite, inputs=inputs,
                   marker=marker)
    print(f"{algorithm}: {len(grids)} matrices to {weights} (block {block_size}) in {seconds:.1f} s; saved to {out} "
          f"(export it with: asvd export onnx {out} --weights {weights} --block-size {block_size})")


def run_quantize(args: argparse.Namespace) -> int:
    quantize_folder(args.model, args.out, args.weights, args.block_size, args.algorithm, args.damping, args.calib,
                    args.calib_samples, args.seqlen, args.seed, args.overwrite, args.clip, args.block_offsets,
                    args.budget_mib)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from exporters import export_onnx

    metadata = export_onnx(None if args.model == "default" else args.model, args.out, opset=args.opset,
                           dtype=args.dtype, device=args.device, fold_value=args.fold_value,
                           absorb_key=args.absorb_key,
                           layout="genai" if args.genai else "asvd", weights=args.weights, block_size=args.block_size,
                           progress=True, overwrite=args.overwrite, graph=args.graph)
    weights = metadata.weights + (f" (block {metadata.block_size})" if metadata.block_size else "")
    print(f"exported a {metadata.kind}-cache model ({metadata.num_layers} layers, opset {metadata.opset}, "
          f"{weights} weights, {metadata.layout} layout, {metadata.graph} graph) to {args.out}")
    if metadata.quantized:
        q = metadata.quantized
        print(f"quantized ops: {q['ops']}; weight bytes quantized {q['quantized_bytes']}, left float {q['float_bytes']}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    """ONNX folder → ONNX Runtime; model folder → PyTorch (so both can be compared from the shell)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    path = Path(args.path)
    if args.runtime == "genai" and not (path / "model.onnx").is_file():
        raise InvalidInputError("--runtime genai runs an ONNX folder exported with --genai, not a PyTorch model folder")
    if (path / "model.onnx").is_file():
        import numpy as np

        from exporters import GenAICausalLM, ORTCausalLM

        if args.runtime == "genai":
            runtime = GenAICausalLM(path, provider=args.provider)
        else:
            runtime = ORTCausalLM(path, provider=args.provider)
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = np.asarray(tokenizer(args.prompt)["input_ids"], dtype=np.int64)[None]
        printed = []

        def stream(token):
            printed.append(int(token[0]))
            if args.stream:
                print(tokenizer.decode(printed[-1:]), end="", flush=True)

        out = runtime.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                               seed=args.seed, streamer=stream)
        if args.runtime == "genai":  # genai's sequence ends at its EOS; ours pads after it
            out = out[:, : ids.shape[1] + args.max_new_tokens]
        new = out[0, ids.shape[1]:]
    else:
        import torch

        from .models import load_model_and_tokenizer

        if args.provider != "cpu":
            raise InvalidInputError("--provider applies to ONNX folders; PyTorch models run on the CPU here")
        model, tokenizer = load_model_and_tokenizer(None if args.path == "default" else args.path)
        ids = torch.tensor([tokenizer(args.prompt)["input_ids"]])
        torch.manual_seed(args.seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=not args.greedy, top_k=0, pad_token_id=tokenizer.pad_token_id or 0)
        new = out[0, ids.shape[1]:]
    if args.stream:
        print()  # the tokens are already on screen
    else:
        print(tokenizer.decode(new, skip_special_tokens=True))
    return 0


def run_zero_shot(args: argparse.Namespace) -> int:
    """``asvd eval MODEL --tasks ...``: lm-eval zero-shot accuracy (see :mod:`asvd_passes.zero_shot`)."""
    import torch

    from .zero_shot import zero_shot

    result = zero_shot(args.model, args.tasks, limit=args.limit, include_path=args.include_path,
                       batch_size=args.batch_size, num_fewshot=args.num_fewshot, dtype=getattr(torch, args.dtype))
    if args.json:
        print(json.dumps({key: value for key, value in result.items() if key != "table"}))
    else:
        print(result["table"])
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    onnx_folder = args.model is not None and any((Path(args.model) / name).is_file() for name in ("model.onnx", "genai_config.json"))
    if args.tasks:
        if onnx_folder:
            raise InvalidInputError("--tasks runs lm-eval on a PyTorch model folder; for an ONNX export use --data (perplexity)")
        return run_zero_shot(args)
    if not args.data:
        raise InvalidInputError("asvd eval needs --data FILE (perplexity) or --tasks NAMES (lm-eval zero-shot accuracy)")
    import torch

    from .evaluate import perplexity
    from .models import load_model_and_tokenizer

    if onnx_folder and (Path(args.model) / "asvd_onnx.json").is_file():  # our export: ONNX Runtime computes the logits
        from exporters import ORTCausalLM

        runtime = ORTCausalLM(args.model, provider=args.provider)
        result = runtime.perplexity(args.data, seqlen=args.seqlen, windows=args.windows, progress=not args.json)
    elif onnx_folder:  # any other decoder-only ONNX folder (e.g. onnxruntime-genai's model builder's), on the CPU EP
        from exporters import ONNXDecoder

        if args.provider != "cpu":
            raise InvalidInputError("--provider cuda/dml/coreml needs a folder exported by asvd; other ONNX folders run on the CPU EP")
        result = ONNXDecoder(args.model).perplexity(args.data, seqlen=args.seqlen, windows=args.windows,
                                                    progress=not args.json)
    else:
        if args.provider != "cpu":
            raise InvalidInputError("--provider applies to ONNX folders; PyTorch models run on the CPU here")
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype))
        result = perplexity(model, tokenizer, args.data, seqlen=args.seqlen, windows=args.windows, progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['ppl']:.3f} (seqlen {result['seqlen']}, {result['windows']} windows, {result['tokens']} tokens)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asvd", description="Activation-aware SVD compression of causal LMs")
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser("compress", help="compress a model and save it")
    add_compress_arguments(compress)
    compress.set_defaults(run=run_compress)

    evaluate = commands.add_parser("eval", help="perplexity (--data) or lm-eval zero-shot accuracy (--tasks) of a model or compressed folder")
    evaluate.add_argument("model", help="model folder, hub id, .gguf file, ONNX folder (ours or any decoder-only one with "
                                         "cache inputs, e.g. onnxruntime-genai's model builder's: perplexity by ONNX Runtime), "
                                         "or 'default' for the embedded model")
    evaluate.add_argument("--data", default=None, help="perplexity: text file (e.g. wiki.test.raw) or hf:NAME[:CONFIG[:SPLIT]]")
    evaluate.add_argument("--tasks", default=None,
                          help="zero-shot accuracy: comma-separated lm-eval tasks (needs pip install 'asvd-passes[eval]')")
    evaluate.add_argument("--limit", type=int, default=None, help="--tasks: at most N documents per task")
    evaluate.add_argument("--include-path", default=None, help="--tasks: folder of extra lm-eval task YAML files")
    evaluate.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples (default: the task's, mostly 0)")
    evaluate.add_argument("--batch-size", type=int, default=1, help="--tasks: lm-eval batch size")
    evaluate.add_argument("--seqlen", type=int, default=512)
    evaluate.add_argument("--windows", type=int, default=None, help="number of windows (default: all)")
    evaluate.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="ONNX Runtime provider (ONNX folders)")
    evaluate.set_defaults(run=run_eval)

    inspect = commands.add_parser("inspect", help="ratios, ranks and measured KV-cache bytes of a saved model")
    inspect.add_argument("model", help="compressed (or dense) model folder")
    inspect.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(run=run_inspect)

    quantize = commands.add_parser(
        "quantize", help="GPTQ every projection and the LM head onto ONNX Runtime's MatMulNBits grid (int4/int8)")
    quantize.add_argument("model", help="model folder (dense, or one that compress wrote), hub id, .gguf, or 'default'")
    quantize.add_argument("--out", required=True, help="output folder: new or empty (written atomically)")
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing output folder that asvd wrote")
    quantize.add_argument("--weights", choices=["int4", "int8"], default="int4")
    quantize.add_argument("--block-size", type=int, default=32, help="weights per quantization block (default 32)")
    quantize.add_argument("--algorithm", choices=["gptq", "rtn"], default="gptq",
                          help="gptq (error compensation against each input's XᵀX) or rtn (ORT's own rounding)")
    quantize.add_argument("--damping", type=float, default=0.01, help="GPTQ: fraction of mean diag(XᵀX) added")
    quantize.add_argument("--no-clip", dest="clip", action="store_false",
                          help="GPTQ: take each block's range from its min/max (as ORT) instead of searching it")
    quantize.add_argument("--budget-mib", type=float, default=None, metavar="MIB",
                          help="ONNX file size: each decoder-block matrix gets the bits (2/4/8), block size and offsets "
                               "that cost the least predicted loss within it (the LM head: int4, block 32/64/128)")
    quantize.add_argument("--block-offsets", action="store_true",
                          help="decoder-block matrices on each block's own [min, max] grid (a fractional zero point, "
                               "as GGUF Q4_1 and HQQ): +1 bit per weight at block 32, exported as a small extra MatMul")
    quantize.add_argument("--calib", default=None, help="calibration text file or hf:NAME (default: selfgen)")
    quantize.add_argument("--calib-samples", type=int, default=16)
    quantize.add_argument("--seqlen", type=int, default=512)
    quantize.add_argument("--seed", type=int, default=0)
    quantize.set_defaults(run=run_quantize)

    export = commands.add_parser("export", help="export a compressed (or dense) model")
    formats = export.add_subparsers(dest="format", required=True)
    onnx = formats.add_parser("onnx", help="ONNX with the (latent) KV cache as explicit inputs/outputs")
    onnx.add_argument("model", help="a folder that compress wrote, or a dense model folder ('default': embedded)")
    onnx.add_argument("--out", required=True, help="output folder: new or empty (written atomically)")
    onnx.add_argument("--overwrite", action="store_true", help="replace an existing output folder that asvd wrote")
    onnx.add_argument("--opset", type=int, default=18)
    onnx.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="float type of the export (see --weights)")
    onnx.add_argument("--weights", choices=["fp32", "fp16", "int8", "int4"], default=None,
                      help="weight format: fp32/fp16, or int8/int4 with ONNX Runtime's MatMulNBits quantizer (default: --dtype)")
    onnx.add_argument("--block-size", type=int, default=32, help="int8/int4: weights per quantization block (default 32)")
    onnx.add_argument("--genai", action="store_true",
                      help="onnxruntime-genai layout: 4-D cache, K/V latents packed into equal-width slots, genai_config.json")
    onnx.add_argument("--graph", choices=["asvd", "builder"], default="asvd",
                      help="asvd: our export (any model we compress); builder: onnxruntime-genai's model builder's "
                           "graph (fused attention, its decode speed) with our weights: a dense or low-rank folder "
                           "in fp32, or on the grids `asvd quantize` recorded (--weights int4|int8); no latent KV cache")
    onnx.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device the export traces on")
    onnx.add_argument("--fold-value", choices=["always", "never"], default="always",
                      help="attend over the V latent then apply V's up (always), or rebuild V (never)")
    onnx.add_argument("--absorb-key", choices=["always", "never"], default="always",
                      help="families without RoPE or a K norm (GPT-2, OPT): score queries against the K latent "
                           "through K's up (always), or rebuild K (never); others always rebuild")
    onnx.set_defaults(run=run_export)

    generate = commands.add_parser("generate", help="generate text with ONNX Runtime (ONNX folder) or PyTorch")
    generate.add_argument("path", help="ONNX folder (ORT) or model folder (PyTorch; 'default': embedded)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--greedy", action="store_true", help="greedy decoding (default: sampling)")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed")
    generate.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    generate.add_argument("--runtime", choices=["ort", "genai"], default="ort",
                          help="ONNX folders: our ORTCausalLM (ort) or onnxruntime-genai (genai; needs a --genai export)")
    generate.add_argument("--stream", action="store_true", help="print tokens as they come (ONNX)")
    generate.set_defaults(run=run_generate)
    return parser


def run_reporting_errors(run, args: argparse.Namespace) -> int:
    """``run(args)``; an error the tool raises on purpose (:class:`ASVDError`) becomes one line and exit status 2.

    Anything else (out of memory, a bug) propagates with its traceback.
    """
    try:
        return run(args)
    except ASVDError as err:
        print(f"asvd: error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "model", None) == "default":
        args.model = None
    return run_reporting_errors(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
