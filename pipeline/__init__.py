"""Kaggle-style image competition pipeline: clean -> folds -> train -> predict -> ensemble.

The method follows the competition chapters of "Dive into Deep Learning" (d2l.ai); comments call the book d2l
(its nets are the d2l_* backbones, its TinySSD the detection baseline).
"""

import os

# albumentations asks PyPI for its latest version on every import (up to 2 s, in every worker process, and a
# network call a competition machine may not allow); the pipeline pins its version instead.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipeline.core import log as _log  # noqa: E402

__version__ = "0.1.0"

_log.setup()  # messages print as they always did, whether the pipeline runs from the CLI, a notebook or a test
