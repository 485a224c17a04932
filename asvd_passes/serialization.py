"""Write an output folder atomically (all of it, or nothing), and only where no one's data is lost.

The rule (:func:`check_output_folder`): a new or empty folder is written; a non-empty one only with
``overwrite`` and only when it holds ``marker`` (the file this tool writes into every such folder);
the model being read, or a folder holding it, never.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError


def check_output_folder(target: str | os.PathLike, overwrite: bool, marker: str,
                        inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Raise :class:`OutputExistsError` unless writing ``target`` loses nothing.

    Called by the entry points before any long work, and again by :func:`atomic_directory` just
    before it replaces ``target``. ``inputs``: the local files and folders the run reads (paths are
    compared resolved, so symlinks and ``..`` do not hide them).
    """
    resolved = Path(target).resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents:
            what = "is" if resolved == source else "contains"
            raise OutputExistsError(f"output folder {target} {what} the input {source}: replacing it would delete "
                                    "the model being read; choose another output folder")
    if not resolved.exists():
        return
    if not resolved.is_dir():
        raise OutputExistsError(f"output {target} exists and is not a folder")
    if not any(resolved.iterdir()):
        return
    if not (resolved / marker).is_file():
        raise OutputExistsError(f"output folder {target} is not empty and holds no {marker} (the file that marks "
                                "a folder this command wrote): it is never replaced, even with --overwrite; choose "
                                "a new or empty folder")
    if not overwrite:
        raise OutputExistsError(f"output folder {target} already exists; pass --overwrite (Python: overwrite=True) "
                                "to replace it, or choose another folder")


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool, marker: str,
                     inputs: Iterable[str | os.PathLike] = ()):
    """Yield a temporary folder beside ``target``; on success it replaces ``target``, on error it vanishes.

    ``target`` is checked by :func:`check_output_folder` before and again at the end (the work may
    take hours; the folder may have changed meanwhile).
    """
    inputs = list(inputs)
    check_output_folder(target, overwrite, marker, inputs)
    shown, target = target, Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        check_output_folder(shown, overwrite, marker, inputs)
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, backup)
            os.replace(staging, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
