"""Which folders ``export_onnx`` may write: refused before loading or tracing, replaced only when asvd wrote them."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

import asvd_passes.models
from asvd_passes.errors import OutputExistsError
from exporters import export_onnx
from exporters.onnx_export import METADATA_FILE, MODEL_FILE


def file_hashes(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model_folder(tmp_path, tiny_model):
    folder = tmp_path / "models" / "llama"
    tiny_model("llama").save_pretrained(folder)
    return folder


@pytest.fixture
def no_work(monkeypatch):
    """Records whether loading or tracing started."""
    reached = []

    def record(name):
        def stand_in(*args, **kwargs):
            reached.append(name)
            raise AssertionError(f"{name} reached")
        return stand_in

    monkeypatch.setattr(asvd_passes.models, "load_model_and_tokenizer", record("loading"))
    monkeypatch.setattr(torch.onnx, "export", record("tracing"))
    return reached


def test_existing_folder_refused_before_loading(model_folder, tmp_path, no_work):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / METADATA_FILE).write_text("{}")  # an earlier export
    with pytest.raises(OutputExistsError, match=rf"{re.escape(str(out))} already exists; pass --overwrite"):
        export_onnx(str(model_folder), out)
    (out / METADATA_FILE).unlink()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=f"holds no {METADATA_FILE}.*even with --overwrite"):
        export_onnx(str(model_folder), out, overwrite=True)
    assert no_work == [] and [p.name for p in out.iterdir()] == ["notes.txt"]


def test_model_object_refused_before_tracing(tiny_model, tmp_path, no_work):
    out = tmp_path / "compressed"  # a compressed model folder is no ONNX export: never replaced by one
    out.mkdir()
    (out / "asvd_report.json").write_text("{}")
    with pytest.raises(OutputExistsError, match=f"holds no {METADATA_FILE}"):
        export_onnx(tiny_model("llama"), out, overwrite=True)
    assert no_work == []


def test_model_folder_and_folders_holding_it_refused(model_folder, tmp_path, no_work):
    before = file_hashes(tmp_path)
    (model_folder / METADATA_FILE).write_text("{}")  # even marked as an export: it is the input
    for target in (model_folder, model_folder.parent, tmp_path):
        with pytest.raises(OutputExistsError, match="the input"):
            export_onnx(str(model_folder), target, overwrite=True)
    (model_folder / METADATA_FILE).unlink()
    assert file_hashes(tmp_path) == before and no_work == []


def test_overwrite_replaces_an_earlier_export(tiny_model, tmp_path):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / METADATA_FILE).write_text("{}")
    (out / "stale.onnx.data").write_bytes(b"from an earlier export")
    export_onnx(tiny_model("llama"), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [METADATA_FILE, MODEL_FILE]
    assert json.loads((out / METADATA_FILE).read_text())["kind"] == "dense"
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]  # no staging or backup folder left
    import onnx

    # No per-node debug annotations of the exporter (stack traces, this machine's paths) in the file.
    proto = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    assert proto.graph.node and not any(node.metadata_props for node in proto.graph.node)
    assert any(entry.key == "asvd_onnx" for entry in proto.metadata_props)
