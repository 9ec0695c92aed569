"""Atomic writes: every file kneebatch writes goes to a temporary name in the same folder and is
renamed into place, so a reader never sees half a file."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def temporary_of(name: str) -> tuple[str, int] | None:
    """(file name, writer's pid) when ``name`` is one of kneebatch's temporaries, else None."""
    found = _TEMPORARY.match(name)
    return (found["name"], int(found["pid"])) if found else None


def left_by_dead_writer(path: Path) -> bool:
    """Whether ``path`` is a temporary whose writer (a process on this host) is gone."""
    found = temporary_of(path.name)
    if found is None:
        return False
    try:
        os.kill(found[1], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def atomic(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder."""
    with atomic(path, "w") as fh:
        fh.write(text)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder."""
    with atomic(path) as fh:
        fh.write(data)
