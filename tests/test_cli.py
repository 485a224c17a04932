"""The ``asvd`` and ``optimum-cli asvd`` commands on a tiny Llama that uses the real tokenizer."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DATA = Path(os.environ.get("ASVD_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")) / "wikitext-2"


def run(*args: str) -> subprocess.CompletedProcess:
    """``asvd ARGS`` in this process (a subprocess would spend seconds re-importing torch): code, stdout, stderr."""
    from asvd_passes.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(list(args))
        except SystemExit as exited:  # argparse's usage errors
            code = exited.code
    return subprocess.CompletedProcess(["asvd", *args], code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A 2-layer Llama with the embedded model's tokenizer (so real text calibrates it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from asvd_passes.models import embedded_model_dir

    if not DATA.is_dir():
        pytest.fail(f"WikiText-2 data missing at {DATA}") if os.environ.get("CI") else pytest.skip("no data")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_compress_then_eval_json(tiny_folder, tmp_path):
    out = tmp_path / "out"
    result = run("compress", str(tiny_folder), "--out", str(out), "--method", "whiten", "--allocation", "fisher",
                 "--param-ratio", "0.7", "--calib", str(DATA / "wiki.valid.tokens"), "--calib-samples", "4",
                 "--seqlen", "64", "--seed", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model.layers.0" in result.stdout and "q_proj=" in result.stdout  # per-layer rank summary
    assert (out / "ranks.png").is_file() and (out / "asvd_config.json").is_file()
    report = json.loads((out / "asvd_report.json").read_text())
    assert report["selected_ratio"] <= 0.7
    evaluated = run("eval", str(out), "--data", str(DATA / "wiki.test.raw"), "--seqlen", "64", "--windows", "3", "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    payload = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert set(payload) >= {"ppl", "seqlen", "windows", "tokens"}
    assert payload["seqlen"] == 64 and payload["windows"] == 3 and payload["tokens"] == 3 * 63


@pytest.mark.parametrize(
    "args, message",
    [
        (["--param-ratio", "1.5"], "param_ratio must lie in (0, 1]"),
        (["--param-ratio", "0"], "param_ratio must lie in (0, 1]"),
        (["--calib", "SHORT"], "fewer than one window"),
        (["--calib", "MISSING"], "not found"),
        (["--seqlen", "4096"], "longer than the model's 2048 positions"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_nothing(tiny_folder, tmp_path, args, message):
    short = tmp_path.parent / f"{tmp_path.name}-short.txt"
    short.write_text("far too short for a window")
    args = [{"SHORT": str(short), "MISSING": str(tmp_path / "nope.txt")}.get(a, a) for a in args]
    out = tmp_path / "out"
    result = run("compress", str(tiny_folder), "--out", str(out), "--calib", str(DATA / "wiki.valid.tokens"),
                 "--calib-samples", "2", "--seqlen", "64", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no output, no staging folder


@pytest.mark.parametrize("args, message", [
    (["--param-ratio", "1.5"], "param_ratio must lie in (0, 1], got 1.5"),
    (["--ranks", "MISSING"], "--ranks file not found"),
    (["--ranks", "NOT_JSON"], "is not a JSON {module_name: rank} map"),
])
def test_intentional_error_is_one_line_and_status_2(tmp_path, capsys, args, message):
    from asvd_passes.cli import main

    (tmp_path / "bad.json").write_text("{not json")
    args = [{"MISSING": str(tmp_path / "nope.json"), "NOT_JSON": str(tmp_path / "bad.json")}.get(a, a) for a in args]
    assert main(["compress", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asvd: error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("failure", [RuntimeError("CUDA out of memory"), ValueError("too many values to unpack")])
def test_unexpected_failure_propagates_with_its_traceback(tmp_path, monkeypatch, failure):
    """Out of memory or a bug is not turned into one line: the exception (and its traceback) reaches the user."""
    import asvd_passes.compressor
    from asvd_passes.cli import main

    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(asvd_passes.compressor.ASVDCompressor, "from_pretrained", broken)
    with pytest.raises(type(failure), match=str(failure)) as caught:
        main(["compress", "--out", str(tmp_path / "out"), "--kv-ratio", "0.5"])
    assert caught.traceback[-1].name == "broken"  # the traceback reaches the line that failed


def test_optimum_cli_compress_reports_an_intentional_error_as_one_line(tmp_path, capsys):
    import argparse

    from optimum.commands.register.asvd_passes import ASVDCompressCommand

    parser = argparse.ArgumentParser()
    ASVDCompressCommand.parse_args(parser)
    command = ASVDCompressCommand.__new__(ASVDCompressCommand)  # what optimum-cli builds, without its parser tree
    command.args = parser.parse_args(["--out", str(tmp_path / "out"), "--param-ratio", "1.5"])
    with pytest.raises(SystemExit) as exited:
        command.run()
    assert exited.value.code == 2
    assert capsys.readouterr().err == "asvd: error: param_ratio must lie in (0, 1], got 1.5\n"


def test_unexpected_failure_prints_a_traceback_from_the_command(tmp_path):
    code = ("import sys, asvd_passes.compressor as c\n"
            "def broken(*a, **k):\n    raise RuntimeError('CUDA out of memory')\n"
            "c.ASVDCompressor.from_pretrained = broken\n"
            "from asvd_passes.cli import main\n"
            f"sys.exit(main(['compress', '--out', {str(tmp_path / 'out')!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1  # Python's own handler, not the tool's one-line exit 2
    assert "Traceback (most recent call last)" in result.stderr and "in broken" in result.stderr
    assert "RuntimeError: CUDA out of memory" in result.stderr and "asvd: error:" not in result.stderr


def test_unknown_architecture_is_a_clear_error(tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    result = run("compress", str(folder), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "architecture" in result.stderr
    assert not (tmp_path / "out").exists()


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", [["compress"], ["export", "onnx"]])
def test_existing_output_folder_refused_without_overwrite(tiny_folder, tmp_path, capsys, monkeypatch, command):
    """Refused before the model is opened: a hub download or a GGUF conversion would come first."""
    import asvd_passes.compressor
    import asvd_passes.models
    from asvd_passes.cli import main

    def not_before_the_check(*args, **kwargs):
        raise AssertionError("the model was opened before the output folder was checked")

    monkeypatch.setattr(asvd_passes.compressor.ASVDCompressor, "from_pretrained", not_before_the_check)
    monkeypatch.setattr(asvd_passes.models, "load_model_and_tokenizer", not_before_the_check)
    marker = "asvd_report.json" if command == ["compress"] else "asvd_onnx.json"
    out = tmp_path / "out"
    out.mkdir()
    (out / marker).write_text("{}")  # a folder asvd wrote
    (out / "weights.bin").write_bytes(b"previous run")
    before = file_hashes(out)
    assert main([*command, str(tiny_folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"output folder {out} already exists; pass --overwrite" in err and err.count("\n") == 1
    (out / marker).unlink()  # now a folder asvd did not write: refused even with --overwrite
    assert main([*command, str(tiny_folder), "--out", str(out), "--overwrite"]) == 2
    assert f"{out} is not empty and holds no {marker}" in capsys.readouterr().err
    before.pop(marker)
    assert file_hashes(out) == before


@pytest.mark.parametrize("command", [["compress"], ["export", "onnx"]])
def test_output_that_is_or_holds_the_input_refused(tiny_folder, capsys, command):
    from asvd_passes.cli import main

    before = file_hashes(tiny_folder.parent)
    for target in (tiny_folder, tiny_folder.parent):
        assert main([*command, str(tiny_folder), "--out", str(target), "--overwrite"]) == 2
        assert "the input" in capsys.readouterr().err
    assert file_hashes(tiny_folder.parent) == before


def test_compress_overwrite_replaces_a_folder_asvd_wrote(tiny_folder, tmp_path):
    from asvd_passes.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "asvd_report.json").write_text("{}")  # what a previous run left
    (out / "stale.txt").write_text("from the previous run")
    calib = tmp_path.parent / f"{tmp_path.name}-calib.txt"  # a short text tokenizes in no time
    calib.write_text(" ".join(DATA.joinpath("wiki.valid.tokens").read_text(encoding="utf-8").split()[:400]))
    assert main(["compress", str(tiny_folder), "--out", str(out), "--method", "svd", "--allocation", "uniform",
                 "--param-ratio", "0.9", "--calib", str(calib), "--calib-samples", "2", "--seqlen", "32",
                 "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "asvd_report.json").read_text())["selected_ratio"] <= 0.9
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or backup folder left


def test_optimum_cli_compress_refuses_an_existing_folder(tmp_path, capsys):
    import argparse

    from optimum.commands.register.asvd_passes import ASVDCompressCommand

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    parser = argparse.ArgumentParser()
    ASVDCompressCommand.parse_args(parser)
    command = ASVDCompressCommand.__new__(ASVDCompressCommand)
    command.args = parser.parse_args(["--out", str(out), "--overwrite"])
    assert command.args.overwrite is True
    with pytest.raises(SystemExit) as exited:
        command.run()
    assert exited.value.code == 2 and "holds no asvd_report.json" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_optimum_cli_plugin_exposes_compress():
    optimum_cli = shutil.which("optimum-cli", path=os.path.dirname(sys.executable)) or shutil.which("optimum-cli")
    assert optimum_cli, "optimum-cli is not installed"
    result = subprocess.run([optimum_cli, "asvd", "compress", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--out", "--param-ratio", "--calib", "--help-all"):
        assert flag in result.stdout
    assert "--method" not in result.stdout


def compress_help(flag: str, capsys, parser=None) -> str:
    """What ``asvd compress FLAG`` (or ``parser`` given FLAG) prints."""
    from asvd_passes.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        if parser is None:
            build_parser().parse_args(["compress", flag])
        else:
            parser.parse_args([flag])
    assert exited.value.code == 0
    return capsys.readouterr().out


def option_lines(text: str) -> list[str]:
    """The lines that name an option or the positional ``model`` (their wrapped help is indented deeper)."""
    return [line for line in text.splitlines() if line.startswith("  -") or line.startswith("  model ")]


def test_compress_help_shows_at_most_15_options_in_groups(capsys):
    text = compress_help("--help", capsys)
    assert len(option_lines(text)) <= 15, option_lines(text)
    for title in ("what to compress:", "calibration:", "run:"):
        assert title in text
    shown = " ".join(line.split()[0] for line in option_lines(text))
    for hidden in ("--method", "--alpha", "--allocation", "--ppl-target", "--strs-candidates", "--kv-group-size"):
        assert hidden not in shown
    assert "ASVD paper reproduction" not in text and "advanced:" not in text


@pytest.mark.parametrize("plugin", [False, True], ids=["asvd", "optimum-cli"])
def test_compress_help_all_shows_the_reproduction_and_advanced_groups(capsys, plugin):
    import argparse

    from optimum.commands.register.asvd_passes import ASVDCompressCommand

    parser = None
    if plugin:
        parser = argparse.ArgumentParser()
        ASVDCompressCommand.parse_args(parser)
    text = compress_help("--help-all", capsys, parser)
    assert "ASVD paper reproduction:" in text and "advanced:" in text
    for flag in ("--method", "--alpha", "--asvd-statistic", "--allocation", "--ppl-target", "--strs-candidates",
                 "--kv-group-size", "--lowrank-form", "--pipeline", "--out", "--param-ratio"):
        assert flag in text
    assert "--output-whitening" not in text  # a research option: ASVDConfig only
    assert len(option_lines(text)) > 15


@pytest.mark.parametrize(
    "argv, kwargs, param_ratio, weights",
    [
        ([], {}, 0.9, True),  # nothing asked for: weights at the default ratio
        (["--kv-ratio", "0.5"], dict(kv_ratio=0.5), None, False),  # a KV ratio alone: K/V only, weights dense
        (["--kv-ratio", "0.5", "--param-ratio", "0.8"], dict(kv_ratio=0.5, param_ratio=0.8), 0.8, True),
        (["--kv-ratio", "1.0", "--kv-bits", "4", "--kv-quant-granularity", "tensor", "--kv-quant-rotate"],
         dict(kv_ratio=1.0, kv_bits=4, kv_quant_granularity="tensor", kv_quant_rotate=True), None, False),
        (["--allocation", "strs", "--ppl-target", "40"], dict(allocation="strs", ppl_target=40.0), None, True),
        (["--lowrank-form", "interpolative"], dict(lowrank_form="interpolative"), 0.9, True),
        # options that only --help-all shows still work
        (["--method", "asvd", "--alpha", "0.3", "--asvd-statistic", "abs_max"],
         dict(method="asvd", alpha=0.3, asvd_statistic="abs_max"), 0.9, True),
        (["--allocation", "strs", "--strs-candidates", "0.5,0.7", "--param-ratio", "0.8"],
         dict(allocation="strs", strs_candidates=[0.5, 0.7], param_ratio=0.8), 0.8, True),
    ],
)
def test_cli_and_python_share_one_param_ratio_rule(argv, kwargs, param_ratio, weights):
    from asvd_passes import ASVDConfig
    from asvd_passes.cli import build_parser, compress_config

    cli = compress_config(build_parser().parse_args(["compress", "--out", "unused", *argv]))
    python = ASVDConfig(calibration="selfgen", **kwargs)  # the CLI's --calib default
    assert python.param_ratio == cli.param_ratio == param_ratio
    assert python.compresses_weights == cli.compresses_weights == weights
    assert python.to_dict() == cli.to_dict()


def test_kv_compress_then_inspect_json(tiny_folder, tmp_path):
    out = tmp_path / "out"
    result = run("compress", str(tiny_folder), "--out", str(out), "--kv-ratio", "0.5", "--kv-group-size", "1",
                 "--calib", str(DATA / "wiki.valid.tokens"), "--calib-samples", "2", "--seqlen", "64")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "K=" in result.stdout and "V=" in result.stdout and "latent KV cache" in result.stdout
    assert "q_proj=" not in result.stdout  # --kv-ratio alone leaves the other projections dense
    inspected = run("inspect", str(out), "--json")
    assert inspected.returncode == 0, inspected.stderr[-2000:]
    info = json.loads(inspected.stdout.strip().splitlines()[-1])
    assert set(info) >= {"param_ratio", "kv_ratio", "kv_bytes_per_token", "dense_kv_bytes_per_token", "ranks", "kv_ranks"}
    assert info["dense_kv_bytes_per_token"] == 2 * 2 * 2 * 8 * 4  # 2 layers × K,V × 2 heads × 8 dims × fp32
    assert info["kv_bytes_per_token"] <= info["dense_kv_bytes_per_token"] // 2 and info["param_ratio"] == 1.0
    widths = sum(sum(r["key"]) + sum(r["value"]) for r in info["kv_ranks"].values())
    assert info["kv_bytes_per_token"] == widths * 4


def test_export_onnx_then_generate_matches_pytorch(tiny_folder, tmp_path):
    compressed, onnx_dir = tmp_path / "compressed", tmp_path / "onnx"
    result = run("compress", str(tiny_folder), "--out", str(compressed), "--param-ratio", "0.9", "--kv-ratio", "0.5",
                 "--calib", str(DATA / "wiki.valid.tokens"), "--calib-samples", "2", "--seqlen", "64")
    assert result.returncode == 0, result.stderr[-2000:]
    exported = run("export", "onnx", str(compressed), "--out", str(onnx_dir))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (onnx_dir / "model.onnx").is_file() and (onnx_dir / "asvd_onnx.json").is_file()
    texts = {}
    for path in (onnx_dir, compressed):
        generated = run("generate", str(path), "--prompt", "The tower is", "--max-new-tokens", "12", "--greedy")
        assert generated.returncode == 0, generated.stderr[-2000:]
        texts[path] = generated.stdout.strip()
        assert texts[path], f"no text generated from {path}"  # two empty outputs would compare equal
    assert texts[onnx_dir] == texts[compressed]
    import onnxruntime

    on_cuda = run("generate", str(onnx_dir), "--prompt", "x", "--provider", "cuda", "--max-new-tokens", "2")
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert on_cuda.returncode == 0, on_cuda.stderr[-2000:]
    else:  # the provider is named, as one line, exit status 2
        assert on_cuda.returncode == 2 and "CUDAExecutionProvider" in on_cuda.stderr and "not available" in on_cuda.stderr
    (tmp_path / "nope").mkdir()  # a folder with no model in it
    bad = run("export", "onnx", str(tmp_path / "nope"), "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and not (tmp_path / "bad").exists()



def test_compress_with_weights_then_export_keeps_the_gptq_codes(tiny_folder, tmp_path):
    """``asvd compress --weights int4`` (compress, then ``asvd quantize``'s GPTQ pass): a float folder on the
    grid + sidecar; the int4 export writes every Linear from the recorded codes, and ORT's logits (accuracy
    level 0) equal the PyTorch model's."""
    from conftest import assert_ort_computes_the_grid

    quantized, onnx_dir = tmp_path / "quantized", tmp_path / "onnx"
    calib = ["--calib", str(DATA / "wiki.valid.tokens"), "--calib-samples", "2", "--seqlen", "64"]
    result = run("compress", str(tiny_folder), "--out", str(quantized), "--param-ratio", "0.8", "--allocation", "uniform",
                 "--weights", "int4", "--block-size", "16", *calib)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(tmp_path.glob(".asvd-compressed-*"))  # the intermediate folder is gone
    assert (quantized / "asvd_nbits.safetensors").is_file() and (quantized / "asvd_report.json").is_file()
    exported = run("export", "onnx", str(quantized), "--out", str(onnx_dir), "--weights", "int4", "--block-size", "16")
    assert exported.returncode == 0, exported.stderr[-2000:]
    meta = json.loads((onnx_dir / "asvd_onnx.json").read_text())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(quantized)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert meta["quantized"]["from_recorded_grids"] == linears and meta["quantized"]["tied_embedding_shared"]
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    assert assert_ort_computes_the_grid(model, onnx_dir, ids) == linears


def test_quantize_writes_a_float_folder_on_the_grid_with_its_sidecar(tiny_folder, tmp_path):
    """``asvd quantize``: a float checkpoint whose weights lie on the recorded grids, the settings beside it, and
    a clear refusal of an existing folder; ``--block-offsets`` records the offsets of every decoder-block matrix."""
    from transformers import AutoModelForCausalLM

    from asvd_passes.quantization.calibrate import grids_of, load_sidecar

    out = tmp_path / "q"
    calib = ["--calib", str(DATA / "wiki.valid.tokens"), "--calib-samples", "2", "--seqlen", "32"]
    result = run("quantize", str(tiny_folder), "--out", str(out), "--algorithm", "rtn", "--block-offsets",
                 "--block-size", "16", *calib)
    assert result.returncode == 0, result.stderr[-2000:]
    settings = json.loads((out / "asvd_nbits.json").read_text())
    assert settings["algorithm"] == "rtn" and settings["block_offsets"] and settings["block_size"] == 16
    grids = grids_of(AutoModelForCausalLM.from_pretrained(out), load_sidecar(out))  # checks every weight's grid
    assert {name for name, q in grids.items() if q.offsets is None} == {"lm_head"} and len(grids) == 15
    again = run("quantize", str(tiny_folder), "--out", str(out), "--algorithm", "rtn", *calib)
    assert again.returncode == 2 and "--overwrite" in again.stderr
