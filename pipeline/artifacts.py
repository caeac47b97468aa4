"""Atomic writes and completion stamps.

Every artifact is written to a temporary file in the same folder and renamed into place, so a killed
run never leaves a half-written file that a later stage would trust. A stage is complete when its
stamp JSON exists and records the same fingerprint (a hash of its config section and of the exact
bytes of its inputs): re-running a chain then skips finished work, and changing an input or a key
redoes exactly the stages it affects.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone makes files private (0600)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_path), then rename tmp_path to path (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def file_stats(paths) -> list[tuple[str, int, int]]:
    """(path, size, mtime) per file: a cheap content key for inputs too big to hash every run."""
    return [(str(p), st.st_size, st.st_mtime_ns) for p in paths for st in [os.stat(p)]]


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_done(stamp: Path, fp: str) -> bool:
    meta = read_json(stamp)
    return bool(meta) and meta.get("fingerprint") == fp


def write_stamp(stamp: Path, fp: str, **meta: Any) -> Path:
    return write_json(stamp, {"fingerprint": fp, **meta})
