"""Kaggle-style image competition pipeline: clean -> folds -> train -> predict -> ensemble."""

from pipeline.core import log as _log

__version__ = "0.1.0"

_log.setup()  # messages print as they always did, whether the pipeline runs from the CLI, a notebook or a test
