"""Lock files on WORK: one process at a time per run (an experiment's fold, its predictions) or per stage that writes
shared files (clean, folds, ensemble, labels, autogluon, detect).

A lock is a JSON file created with O_CREAT | O_EXCL (atomic on local filesystems and on NFSv3+), holding its owner's
pid, host, start time, a random token and a heartbeat time that a daemon thread refreshes every `heartbeat_s`. A lock
is stale, and the next process takes it over with a one-line note, when its owner is a dead pid on this host, or when
its heartbeat is older than `timeout_s` (another host's process cannot be looked up, so only its silence counts; the
hosts' clocks are assumed to agree within a fraction of the timeout, as NTP keeps them).

Why hand-written rather than the `filelock` package: filelock's UnixFileLock is flock(), which is released by the
kernel when its process dies, so a SIGKILLed holder is handled, but flock is not shared across NFS clients on many
set-ups, and SoftFileLock (its O_EXCL variant) has no heartbeat and never takes over a stale file: after a SIGKILL
every later process would wait forever. Holding WORK on a shared disk for several machines (SLURM, Ray) needs both.

A takeover is itself guarded by a second O_EXCL file (`<lock>.takeover`), so two processes that find one stale lock
at once cannot both remove it and each believe they won (one would remove the other's fresh lock).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pipeline.core.artifacts import HOST, pid_running, write_text

HEARTBEAT_S = 10.0
TIMEOUT_S = 60.0  # six missed heartbeats: a process held up by a slow disk is not taken over
POLL_S = 0.5


def _now() -> float:
    return time.time()


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def read_holder(path: Path) -> dict | None:
    """The lock's content; {} when it exists but is not (yet) readable JSON (its creator is between the O_EXCL create
    and the write); None when there is no lock."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        obj = json.loads(text)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def describe(holder: dict) -> str:
    """'pid 123 on host h (since 2026-01-01 10:00:00 UTC)' for one-line messages."""
    if not holder:
        return "a process still writing the lock"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {_stamp(holder.get('started', 0))})"


def stale_reason(path: Path, holder: dict, timeout_s: float, now: float | None = None) -> str | None:
    """Why the lock `holder` at `path` no longer holds anything, or None while its owner may be alive."""
    now = _now() if now is None else now
    if not holder:  # unreadable: stale only once the file itself is older than the timeout
        try:
            age = now - os.stat(path).st_mtime
        except FileNotFoundError:
            return "gone"
        return f"unreadable for {age:.0f} s" if age > timeout_s else None
    if holder.get("host") == HOST and not pid_running(int(holder.get("pid", 0))):
        return "its process is gone"
    age = now - float(holder.get("heartbeat", 0))
    if age > timeout_s:
        return f"no heartbeat for {age:.0f} s"
    return None


class Lock:
    """One lock file. `acquire(wait=False)` tries once; `acquire(wait=True)` polls until it holds the lock, saying
    once whom it waits for. A held lock's heartbeat thread runs until `release`. Used as a context manager it waits."""

    def __init__(self, path: Path, what: str, say: Callable[[str], None] = print, timeout_s: float = TIMEOUT_S,
                 heartbeat_s: float = HEARTBEAT_S):
        self.path, self.what, self.say = Path(path), what, say
        self.timeout_s, self.heartbeat_s = timeout_s, heartbeat_s
        self.token: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _content(self, started: float) -> str:
        return json.dumps({"pid": os.getpid(), "host": HOST, "started": started, "heartbeat": _now(),
                           "token": self.token, "what": self.what}) + "\n"

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        self.token = secrets.token_hex(8)
        self._started = _now()
        with os.fdopen(fd, "w") as fh:
            fh.write(self._content(self._started))
        return True

    def _take_over(self) -> bool:
        """Remove a stale lock under the takeover guard, then create ours; False when it is not stale after all."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # another process is taking it over; a guard left by a killed one expires
            with contextlib.suppress(FileNotFoundError):
                if _now() - os.stat(guard).st_mtime > self.timeout_s:
                    os.unlink(guard)
            return False
        os.close(fd)
        try:
            holder = read_holder(self.path)
            if holder is None:
                return self._create()
            why = stale_reason(self.path, holder, self.timeout_s)
            if why is None:
                return False
            os.unlink(self.path)
            if not self._create():
                return False
            self.say(f"{self.what}: took over {self.path} from {describe(holder)}: {why}")
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(guard)

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not (self._create() or self._take_over()):
            return False
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lock {self.path.name}", daemon=True)
        self._beat.start()
        return True

    def acquire(self, wait: bool = True) -> bool:
        if self.try_acquire():
            return True
        if not wait:
            return False
        self.say(f"{self.what}: waiting for {describe(read_holder(self.path) or {})}, which holds {self.path}")
        while not self.try_acquire():
            time.sleep(POLL_S)
        return True

    def holder(self) -> dict | None:
        return read_holder(self.path)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            held = read_holder(self.path)
            if not held or held.get("token") != self.token:  # taken over (we were silent too long): say so, stop
                self.say(f"{self.what}: lost {self.path} to {describe(held or {})}; another process took it over")
                return
            write_text(self.path, self._content(self._started))  # atomic: readers never see half a heartbeat

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        held = read_holder(self.path)
        if held and held.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.token = None

    def __enter__(self) -> Lock:
        self.acquire(wait=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()
