"""Files written whole: every file the project writes goes to a temporary name beside its place and is renamed
there once complete, so a crash or a full disk never leaves a half-written file where a whole one is expected."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (hidden, same suffix, so that writers that choose a format by the suffix
    still do) for the block to write to; renamed to ``path`` when the block ends, removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, text: str) -> None:
    """Write a text file whole (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
