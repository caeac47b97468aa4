"""Atomic writes, completion stamps and content keys.

Every artifact is written to a temporary file in the same folder and renamed into place, so a killed
run never leaves a half-written file that a later stage would trust. A stage is complete when its
stamp JSON exists and records the same fingerprint: a hash of the config keys the stage reads and of
the bytes of the files it reads (input images and CSVs, upstream artifacts). Re-running a chain then
skips finished work, and changing an input or a key redoes exactly the stages that read it. Keys
hash file contents, not sizes or dates: an image rewritten with the same size and its old mtime
restored is still noticed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.errors import PipelineError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone makes files private (0600)


# Temporary names carry the writer's pid and host (.<name>.<pid>@<host>.<random>.tmp): a writer killed before its
# rename (SIGKILL, the OOM killer) leaves its file behind, and the next write of the same artifact removes it once no
# process of that pid runs on this host. Another host's files are left alone: WORK may be shared, and its pids are
# not ours to look up.
_HOST = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0]) or "host"
HOST = _HOST  # this host, as temp names and lock files record it
_TEMP = re.compile(r"\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]+)\.[A-Za-z0-9_]+\.tmp$")


def pid_running(pid: int) -> bool:
    """Whether a process of this pid runs on this host (the temp-file sweep and core/locks.py ask)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_dead_temps(path: Path) -> list[Path]:
    """Remove the temporary files of `path` that writers on this host left when they died; returns them."""
    path = Path(path)
    prefix, swept = f".{path.name}.", []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return swept
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        found = _TEMP.fullmatch(entry.name, len(prefix) - 1)
        if found and found["host"] == _HOST and not pid_running(int(found["pid"])):
            with contextlib.suppress(FileNotFoundError):  # another writer swept it first
                os.unlink(entry.path)
                swept.append(Path(entry.path))
    return swept


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_path), then rename tmp_path to path (same folder, so the rename is atomic); the temporary files
    of earlier writers of path that died on this host are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}@{_HOST}.", suffix=".tmp", dir=path.parent)
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


def read_json(path: Path, fix: str) -> dict:
    """A JSON artifact a stage needs; missing or damaged, one line naming it and `fix` (e.g. "run `make folds`")."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; {fix}") from None
    except (OSError, ValueError) as exc:  # a folder, no permission, not UTF-8, not JSON
        raise PipelineError(f"{path}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0]}); {fix}") from None
    if not isinstance(obj, dict):
        raise PipelineError(f"{path}: not a JSON object; {fix}")
    return obj


def read_stamp(path: Path) -> dict | None:
    """A stamp or other optional JSON file; None when missing or damaged (the work it stamps is then redone)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


_DIGESTS: dict[tuple, str] = {}  # (path, device, inode, size, mtime, ctime) -> digest, for this process
_SETTLED_NS = 2_000_000_000  # files changed more recently than this are always read again


def file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes (16 hex digits), read in 1 MiB chunks: about 12 us per small file plus 0.7 ms per MB.

    Within one process a file is read once while its status is unchanged: its ctime moves on every write and cannot be
    set back (os.utime restores mtime only). Files changed in the last 2 s are read every time, since timestamps are
    coarser than the time a rewrite takes.
    """
    st = os.stat(path)
    key = (os.fspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = hashlib.sha256()  # with SHA-NI the fastest of hashlib's (1.4 GB/s here, blake2b 0.7)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    out = digest.hexdigest()[:16]
    if time.time_ns() - st.st_ctime_ns > _SETTLED_NS:
        _DIGESTS[key] = out
    return out


def content_key(paths) -> str:
    """One key for the listed files, in order: their paths and the digests of their bytes."""
    return fingerprint([(str(p), file_digest(p)) for p in paths])


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_done(stamp: Path, fp: str, outputs=()) -> bool:
    """The stamp records this fingerprint and every output file it stands for still exists."""
    meta = read_stamp(stamp)
    return meta is not None and meta.get("fingerprint") == fp and all(Path(p).exists() for p in outputs)


def write_stamp(stamp: Path, fp: str, **meta: Any) -> Path:
    return write_json(stamp, {"fingerprint": fp, **meta})
