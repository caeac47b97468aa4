"""Kaggle-style image competition pipeline: clean -> folds -> train -> predict -> ensemble."""

__version__ = "0.1.0"
