"""Output folders that appear whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CompressError


def check_output(target: Path, overwrite: bool) -> None:
    """Fail early (before any long work) if `target` cannot be written."""
    if target.exists() and not overwrite:
        raise CompressError(f"output {target} already exists; choose another path or pass --overwrite")
    if target.exists() and not target.is_dir():
        raise CompressError(f"output {target} exists and is not a folder")
    parent = _existing_ancestor(target.parent)
    if not parent.is_dir():
        raise CompressError(f"cannot write output folder {target}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CompressError(f"output folder {target.parent} is not writable (no write permission on {parent})")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def replace_dir(source: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished folder `source` to `target` (replacing it only if `overwrite`)."""
    check_output(target, overwrite)
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(old / "previous")
        source.rename(target)
        shutil.rmtree(old)
    else:
        source.rename(target)


@contextmanager
def atomic_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it is renamed to `target`
    (replacing it only if `overwrite`), on failure it is removed."""
    check_output(target, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise CompressError(f"cannot write output folder {target}: {e.strerror}") from None
    try:
        yield tmp
        replace_dir(tmp, target, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
