"""Atomic file writing: a temporary file in the destination's folder, renamed over it at the end.

A reader never sees a half-written file, and an interrupted write leaves only the temporary
file's removal behind (names ``.<name>.*.tmp``, so they are easy to recognise and clean up).
"""

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: Path, mode: str = "wb", durable: bool = False, **open_args) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it over ``path``.

    Arguments:
        path: the destination; missing folders are created.
        mode: ``"wb"`` or ``"w"``.
        durable: flush the data to disk before the rename (for checkpoints).
        open_args: passed to ``open`` (for example ``encoding``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, mode, **open_args) as file:
            yield file
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """UTF-8 text; file names that are not valid UTF-8 pass through unchanged."""
    with atomic_write(path, "w", encoding="utf-8", errors="surrogateescape") as file:
        file.write(text)


def write_json_atomic(path: Path, value: Any, indent: int = 1) -> None:
    write_text_atomic(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")
