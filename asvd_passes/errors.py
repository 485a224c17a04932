"""Errors the tool raises on purpose: input it cannot handle, a missing file or optional package,
a device or provider that is not there.

Each derives from :class:`ASVDError` and from the built-in class a caller would expect
(``ValueError``, ``FileNotFoundError``, ...), so ``except ValueError`` keeps working. The ``asvd``
command prints an ``ASVDError`` as one line and exits with status 2; any other exception (out of
memory, a bug) propagates with its traceback.
"""

from __future__ import annotations


class ASVDError(Exception):
    """Base of every error raised on purpose, with a message that says what to do."""


class InvalidInputError(ASVDError, ValueError):
    """A model, option, file content or data the tool cannot handle."""


class MissingFileError(ASVDError, FileNotFoundError):
    """A file or folder the user named does not exist or is not what it should be."""


class OutputExistsError(ASVDError, FileExistsError):
    """The output path may not be written: a file, a folder this tool did not write (or without
    ``overwrite``), or the input model itself or a folder holding it."""


class MissingDependencyError(ASVDError, ImportError):
    """An optional package the requested feature needs is not installed."""


class UnavailableError(ASVDError, RuntimeError):
    """A device or execution provider that was asked for is not available on this machine."""
