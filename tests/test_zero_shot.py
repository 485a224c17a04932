"""Zero-shot accuracy through lm-evaluation-harness (``asvd eval DIR --tasks ...``), offline.

The task is local: 20 hand-written general-knowledge multiple-choice questions in
``tests/data/lm_eval_tasks/tiny_mc.jsonl``. lm-eval 0.4.13 hands ``data_files`` to
``datasets.load_dataset`` unchanged, so a relative path would be read relative to the working
directory (checked: a YAML beside the JSONL with ``test: tiny_mc.jsonl``, run from another
folder, fails with ``FileNotFoundError: Unable to find '/tmp/tiny_mc.jsonl'``). The task YAML is
therefore written once per session into a temporary folder, with the JSONL's absolute path.

The tiny models are random 2-layer Llamas with the real SmolLM2 tokenizer (lm-eval tokenizes
text), so their accuracy is near chance: what is tested is that it is *computed* on the model
given (compressed ≠ dense per-sample log-likelihoods, accuracy = argmax of those), not its level.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("lm_eval") is None and not os.environ.get("CI"):  # CI installs it: fail there
    pytest.skip('lm-eval is not installed: pip install -e ".[eval]"', allow_module_level=True)

import asvd_passes as ap
from asvd_passes.cli import main
from asvd_passes.models import embedded_model_dir, load_model_and_tokenizer
from asvd_passes.zero_shot import zero_shot

TASK = "asvd_tiny_mc"
QUESTIONS = Path(__file__).parent / "data" / "lm_eval_tasks" / "tiny_mc.jsonl"
DATA = Path(os.environ.get("ASVD_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")) / "wikitext-2"
VALID_SPLIT = DATA / "wiki.valid.tokens"

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """A folder holding the local task's YAML (absolute data path); shared so lm-eval indexes it once."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=json.dumps(str(QUESTIONS.resolve()))))
    return folder


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """``(dense_dir, compressed_dir, compressed_model, tokenizer)``: a random tiny Llama with the SmolLM2
    tokenizer saved dense, and its whiten-0.8 compression (saved, and the in-memory model)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
        config = AutoConfig.for_model(
            "llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        root = tmp_path_factory.mktemp("tiny")
        dense, compressed = root / "dense", root / "compressed"
        model.save_pretrained(dense)
        tokenizer.save_pretrained(dense)
        text = QUESTIONS.read_text() * 4  # calibration: token ids of real text, no download
        ids = torch.tensor(tokenizer(text)["input_ids"][: 4 * 16]).reshape(4, 16)
        report = ap.ASVDCompressor(model, tokenizer).compress(
            ap.ASVDConfig(method="whiten", param_ratio=0.8, seqlen=16, calib_samples=4),
            calibration=ids, save_dir=compressed, progress=False,
        )
        assert any(rank is not None for rank in report.ranks.values())
    finally:
        torch.set_num_threads(previous)
    return dense, compressed, model, tokenizer


def choice_loglikelihoods(record: dict) -> list[float]:
    """Per-choice log-likelihoods of one lm-eval multiple-choice record (``resps``: [[(ll, is_greedy)], ...])."""
    return [float(resp[0][0]) for resp in record["resps"]]


def check_accuracy_from_samples(result: dict, task: str = TASK) -> None:
    """acc = fraction of documents whose argmax log-likelihood is the target; acc_norm the same per choice character."""
    metrics, records = result["tasks"][task], result["samples"][task]
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
    hits, hits_norm = [], []
    for record in records:
        lls = np.array(choice_loglikelihoods(record))
        lengths = np.array([len(choice) for choice in record["doc"]["choices"]], dtype=float)  # characters
        target = int(record["target"])
        hits.append(int(np.argmax(lls)) == target)
        hits_norm.append(int(np.argmax(lls / lengths)) == target)
        assert (record["acc"], record["acc_norm"]) == (float(hits[-1]), float(hits_norm[-1]))
    assert metrics["acc"] == pytest.approx(float(np.mean(hits)), abs=1e-12)
    assert metrics["acc_norm"] == pytest.approx(float(np.mean(hits_norm)), abs=1e-12)


def sample_lls(result: dict, task: str = TASK) -> dict[int, list[float]]:
    return {record["doc_id"]: choice_loglikelihoods(record) for record in result["samples"][task]}


def test_compressed_accuracy_is_computed_not_copied(tiny_folders, task_dir, compressed_run):
    dense_dir, compressed_dir, compressed_model, tokenizer = tiny_folders
    dense = zero_shot(str(dense_dir), [TASK], include_path=str(task_dir), log_samples=True)
    compressed = compressed_run

    for result in (dense, compressed):
        assert set(result["tasks"]) == {TASK}
        assert result["n_samples"] == {TASK: 20} and len(result["samples"][TASK]) == 20
        assert result["limit"] is None and result["num_fewshot"] is None
        assert TASK in result["table"] and "acc" in result["table"]
        check_accuracy_from_samples(result)

    dense_lls, compressed_lls = sample_lls(dense), sample_lls(compressed)
    assert dense_lls.keys() == compressed_lls.keys() == set(range(20))
    differences = [abs(a - b) for doc in dense_lls for a, b in zip(dense_lls[doc], compressed_lls[doc])]
    assert min(differences) > 0.0, "a compressed log-likelihood equals the dense one"

    # The folder run used the factored model: the folder loads with LowRankLinear modules, and the
    # in-memory compressed model, passed in as an object, gives the same log-likelihoods.
    loaded, _ = load_model_and_tokenizer(compressed_dir)
    lowrank = {name for name, module in loaded.named_modules() if isinstance(module, ap.LowRankLinear)}
    assert lowrank and lowrank == {n for n, m in compressed_model.named_modules() if isinstance(m, ap.LowRankLinear)}
    again = zero_shot(compressed_model, TASK, include_path=task_dir, tokenizer=tokenizer, log_samples=True)
    again_lls = sample_lls(again)
    for doc, lls in compressed_lls.items():
        assert again_lls[doc] == pytest.approx(lls, rel=1e-5, abs=1e-5)
    dense_model, _ = load_model_and_tokenizer(dense_dir)
    assert not any(isinstance(module, ap.LowRankLinear) for module in dense_model.modules())


@pytest.fixture(scope="session")
def compressed_run(tiny_folders, task_dir) -> dict:
    """One logged run of all 20 documents on the compressed tiny folder (batch size 1), read, never changed,
    by the tests below (an lm-eval run costs seconds; the real-model test covers batch size 4)."""
    return zero_shot(str(tiny_folders[1]), [TASK], include_path=str(task_dir), log_samples=True)


@pytest.fixture
def compressed_hits(compressed_run) -> list[tuple[float, float]]:
    """``(acc, acc_norm)`` of each of the 20 documents in order: what a run limited to the first N must average."""
    records = sorted(compressed_run["samples"][TASK], key=lambda record: record["doc_id"])
    return [(record["acc"], record["acc_norm"]) for record in records]


def expected_metrics(hits: list[tuple[float, float]], limit: int) -> dict[str, float]:
    return {"acc": float(np.mean([h[0] for h in hits[:limit]])), "acc_norm": float(np.mean([h[1] for h in hits[:limit]]))}


def test_limit_and_no_samples(tiny_folders, task_dir, compressed_hits):
    compressed_dir = tiny_folders[1]
    result = zero_shot(compressed_dir, TASK, limit=5, include_path=task_dir)
    assert result["n_samples"] == {TASK: 5} and result["limit"] == 5
    assert "samples" not in result
    metrics = result["tasks"][TASK]
    assert {name: metrics[name] for name in ("acc", "acc_norm")} == pytest.approx(expected_metrics(compressed_hits, 5))


def test_cli_json(tiny_folders, task_dir, compressed_hits, capsys):
    compressed_dir = tiny_folders[1]
    code = main(["eval", str(compressed_dir), "--tasks", TASK, "--include-path", str(task_dir), "--limit", "5", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    result = json.loads(lines[0])
    metrics = result["tasks"][TASK]
    assert {name: metrics[name] for name in ("acc", "acc_norm")} == pytest.approx(expected_metrics(compressed_hits, 5))
    assert result["n_samples"] == {TASK: 5} and result["limit"] == 5
    assert "table" not in result and "samples" not in result


def test_cli_table(tiny_folders, task_dir, compressed_hits, capsys):
    compressed_dir = tiny_folders[1]
    code = main(["eval", str(compressed_dir), "--tasks", f" {TASK} ,", "--include-path", str(task_dir), "--limit", "3"])
    out = capsys.readouterr().out
    assert code == 0
    rows = {}  # lm-eval's markdown table: |Tasks|Version|Filter|n-shot|Metric| |Value| |Stderr|
    for line in out.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) > 7 and cells[5] in ("acc", "acc_norm"):
            rows[cells[5]] = cells[7]
    expected = expected_metrics(compressed_hits, 3)
    assert rows.get("acc") == f"{expected['acc']:.4f}" and rows.get("acc_norm") == f"{expected['acc_norm']:.4f}", out


def test_unknown_task_is_named(tiny_folders, task_dir, capsys):
    compressed_dir = tiny_folders[1]
    with pytest.raises(ValueError, match=r"unknown lm-eval task 'asvd_tiny_mcq'.*did you mean 'asvd_tiny_mc'"):
        zero_shot(compressed_dir, [TASK, "asvd_tiny_mcq"], include_path=task_dir)
    code = main(["eval", str(compressed_dir), "--tasks", "no_such_task_xyz", "--include-path", str(task_dir)])
    assert code == 2
    assert "unknown lm-eval task 'no_such_task_xyz'" in capsys.readouterr().err


@pytest.mark.parametrize("tasks", [[], "", " , ", [" "]])
def test_empty_task_list(tasks):
    with pytest.raises(ValueError, match="no lm-eval task given"):
        zero_shot("unused", tasks)


def test_missing_include_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder of lm-eval task YAML files"):
        zero_shot("unused", [TASK], include_path=tmp_path / "nowhere")


def test_model_object_needs_tokenizer(tiny_folders, task_dir):
    with pytest.raises(ValueError, match="needs its tokenizer"):
        zero_shot(tiny_folders[2], [TASK], include_path=task_dir)


def test_lm_eval_missing(monkeypatch, capsys, tmp_path):
    import sys

    for name in [name for name in sys.modules if name == "lm_eval" or name.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "asvd-passes\[eval\]"'):
        zero_shot(tmp_path, [TASK])
    assert main(["eval", str(tmp_path), "--tasks", TASK]) == 2
    assert "lm-evaluation-harness" in capsys.readouterr().err


def test_eval_needs_data_or_tasks(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "asvd eval needs --data FILE (perplexity) or --tasks NAMES" in capsys.readouterr().err


@pytest.mark.real_model
def test_real_model_dense_vs_compressed(task_dir, smollm2_09_kv05):
    """SmolLM2-135M dense vs compressed (param 0.9 + latent KV 0.5, the session's shared compressed folder,
    see conftest) on the 20 local questions: what is tested is the evaluation path on a real compressed
    folder, not the compression, so it reuses the one the ONNX tests export."""
    _, _, out = smollm2_09_kv05
    dense = zero_shot(None, [TASK], include_path=task_dir, log_samples=True, batch_size=4)
    compressed = zero_shot(out, [TASK], include_path=task_dir, log_samples=True, batch_size=4)
    for result in (dense, compressed):
        assert result["n_samples"] == {TASK: 20}
        check_accuracy_from_samples(result)
    dense_lls, compressed_lls = sample_lls(dense), sample_lls(compressed)
    assert all(dense_lls[doc] != compressed_lls[doc] for doc in dense_lls)
    print(f"\nSmolLM2-135M on {TASK}: dense acc {dense['tasks'][TASK]['acc']:.2f} acc_norm "
          f"{dense['tasks'][TASK]['acc_norm']:.2f}; param 0.9 + KV 0.5 acc {compressed['tasks'][TASK]['acc']:.2f} "
          f"acc_norm {compressed['tasks'][TASK]['acc_norm']:.2f}")
