"""The output-folder rule and the atomic writer, without a model: what may be written, what is refused."""

from __future__ import annotations

import re

import pytest

from asvd_passes.errors import OutputExistsError
from asvd_passes.serialization import atomic_directory, check_output_folder

MARKER = "asvd_report.json"


def leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial" in p.name or ".old-" in p.name)


def folder_with(path, *names):
    path.mkdir(parents=True)
    for name in names:
        (path / name).write_text(name)
    return path


@pytest.mark.parametrize("overwrite", [False, True])
def test_new_or_empty_folder_accepted(tmp_path, overwrite):
    check_output_folder(tmp_path / "new" / "out", overwrite, MARKER)
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", overwrite, MARKER)


def test_folder_this_tool_wrote_needs_overwrite(tmp_path):
    out = folder_with(tmp_path / "out", MARKER, "model.safetensors")
    with pytest.raises(OutputExistsError, match=rf"{re.escape(str(out))}.*--overwrite.*overwrite=True"):
        check_output_folder(out, False, MARKER)
    check_output_folder(out, True, MARKER)


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_folder_refused_even_with_overwrite(tmp_path, overwrite):
    out = folder_with(tmp_path / "home", "thesis.tex")
    with pytest.raises(OutputExistsError, match=rf"{re.escape(str(out))} is not empty and holds no {MARKER}.*even with --overwrite"):
        check_output_folder(out, overwrite, MARKER)
    # Another command's marker does not count: an ONNX export may not replace a compressed model.
    with pytest.raises(OutputExistsError, match="holds no asvd_onnx.json"):
        check_output_folder(folder_with(tmp_path / "compressed", MARKER), overwrite, "asvd_onnx.json")


def test_file_refused(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(OutputExistsError, match="not a folder"):
        check_output_folder(target, True, MARKER)


def test_input_and_its_ancestors_refused_even_when_marked(tmp_path):
    model = folder_with(tmp_path / "models" / "mine", MARKER, "config.json")
    (tmp_path / "models" / MARKER).write_text("{}")  # even a marked ancestor: it holds the input
    for target in (model, model.parent, tmp_path / "models" / "mine" / ".." / "mine"):
        with pytest.raises(OutputExistsError, match=r"the input"):
            check_output_folder(target, True, MARKER, inputs=[model])
    check_output_folder(model / "compressed", True, MARKER, inputs=[model])  # inside it is fine
    check_output_folder(tmp_path / "sibling", True, MARKER, inputs=[model])


def test_input_file_and_symlinks_resolved(tmp_path):
    gguf = tmp_path / "models" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    (tmp_path / "link").symlink_to(gguf.parent, target_is_directory=True)
    for target in (gguf.parent, tmp_path / "link", tmp_path):
        with pytest.raises(OutputExistsError, match="contains the input"):
            check_output_folder(target, True, MARKER, inputs=[gguf])
    with pytest.raises(OutputExistsError, match="is the input"):
        check_output_folder(tmp_path / "link", True, MARKER, inputs=[gguf.parent])


def test_atomic_directory_replaces_a_marked_folder(tmp_path):
    out = folder_with(tmp_path / "out", MARKER, "stale.bin")
    with atomic_directory(out, True, MARKER) as staging:
        (staging / MARKER).write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER] and (out / MARKER).read_text() == "new"
    assert leftovers(tmp_path) == []


def test_atomic_directory_checks_again_at_the_end(tmp_path):
    """A folder that turned non-empty (or foreign) while the work ran is left alone; the staging folder goes."""
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputExistsError, match=f"holds no {MARKER}"):
        with atomic_directory(out, True, MARKER) as staging:
            (staging / MARKER).write_text("new")
            (out / "notes.txt").write_text("written meanwhile")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert leftovers(tmp_path) == []


def test_atomic_directory_refuses_before_yielding(tmp_path):
    out = folder_with(tmp_path / "out", MARKER)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with atomic_directory(out, False, MARKER):
            pytest.fail("the body must not run")
    assert leftovers(tmp_path) == []
