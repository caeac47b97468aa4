"""Kaggle-style image competition pipeline: clean -> folds -> train -> predict -> ensemble.

The method follows the competition chapters of "Dive into Deep Learning" (d2l.ai); comments call the book d2l
(its nets are the d2l_* backbones, its TinySSD the detection baseline).
"""

from pipeline.core import log as _log

__version__ = "0.1.0"

_log.setup()  # messages print as they always did, whether the pipeline runs from the CLI, a notebook or a test
