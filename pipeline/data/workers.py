"""Worker processes that end with the process that started them.

A process pool's workers outlive a parent killed by SIGKILL (no cleanup runs then), and the pool's queue
would keep them decoding for minutes; `end_with_parent` as the pool's initializer ends each worker with its
parent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent(parent: int) -> None:
    """Pool initializer: the worker ends when the process that started it does, even by SIGKILL (no cleanup runs
    then, and the pool's queue would keep it decoding for minutes). Linux: the kernel kills it (prctl
    PR_SET_PDEATHSIG); on every POSIX system a daemon thread also polls for the parent's death (the worker
    reparented away).
    """
    if os.name != "posix":
        return
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    first = os.getppid()
    if first != parent and not _alive(parent):  # the parent died before this worker ran
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(first,), name="end-with-parent", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _watch_parent(first: int) -> None:
    while os.getppid() == first:
        time.sleep(0.5)
    os._exit(1)
