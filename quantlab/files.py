"""Atomic file writing: a result is either complete on disk or absent, never truncated; and the checks
that keep an output path from replacing a folder or one of the run's own input files."""
from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def check_output_path(path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """``path`` as a Path if a file can be written there; else a ValueError naming it: when it is a
    folder, when a parent is a file, when its nearest existing folder takes no new file (a throw-away
    file is made and removed there: permissions, a read-only disk, /proc), or when it is one of ``inputs``
    (writing would replace an input). Call it before the computation whose result goes to ``path``."""
    path = Path(path)
    if not path.name or path.is_dir():
        raise ValueError(f"output {path} is a folder; give a file path inside it")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"output {path} cannot be written: {parent} is a file, not a folder")
            try:
                tempfile.TemporaryFile(dir=parent).close()
            except OSError as err:
                raise ValueError(f"output {path} cannot be written: {parent} takes no new file ({err.strerror}); "
                                 "choose another path") from None
            break
    for source in inputs:
        if Path(source).exists() and path.exists() and path.samefile(source):
            raise ValueError(f"output {path} is also an input of this run; writing it would replace that "
                             "input: give another output path")
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (parent folders created); when the block succeeds the
    temporary file is flushed to disk and replaces ``path`` in one rename, else it is removed.

    The temporary name is hidden and unique to this write (``.<name>.<random>.tmp``), so concurrent
    writers do not collide and no user file is overwritten or deleted on the way."""
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        with tmp.open("rb") as file:
            os.fsync(file.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
