"""What users see: every module logs to its own logger under `pipeline`; one handler prints the messages as they
are (no level or time prefix: the stage name starts each line), errors to stderr, the rest to stdout.

The handler looks up sys.stdout/sys.stderr at each message instead of keeping the stream it started with, so
output captured or redirected later (pytest, notebooks, tqdm's redirect) still receives it. `--quiet` shows
warnings and errors only, `--verbose` adds debug messages with their logger's name.
"""

from __future__ import annotations

import logging
import sys

ROOT = "pipeline"


class UserHandler(logging.Handler):
    """Print each record's message to the current stdout (stderr from ERROR up)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.ERROR else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # a closed or broken stream must not stop a training run
            self.handleError(record)


def setup(level: int = logging.INFO) -> logging.Logger:
    """The `pipeline` logger with one UserHandler at `level` (idempotent: calling again only changes the level)."""
    logger = logging.getLogger(ROOT)
    handler = next((h for h in logger.handlers if isinstance(h, UserHandler)), None)
    if handler is None:
        handler = UserHandler()
        logger.addHandler(handler)
        logger.propagate = False  # a user's own root handler would print every line twice
    fmt = "%(name)s: %(message)s" if level <= logging.DEBUG else "%(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    logger.setLevel(level)
    return logger
