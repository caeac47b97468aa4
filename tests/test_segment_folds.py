"""Folds of a segmentation training set: stratified on which classes an image holds, duplicate groups of
WORK/clean.csv in one fold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.core.errors import PipelineError
from pipeline.detection.folds import assign_folds, image_groups
from pipeline.segmentation.arrays import presence, presence_strata


def test_presence_reads_each_class_of_each_image():
    masks = np.zeros((3, 2, 4, 4), np.uint8)
    masks[0, 1, 2, 2] = 1
    masks[2, :, 0, 0] = 1
    assert presence(masks).tolist() == [[False, True], [False, False], [True, True]]


def test_rare_patterns_share_a_label_or_join_the_commonest():
    held = np.array([[1, 0]] * 6 + [[0, 1]] * 3 + [[1, 1]] * 2 + [[0, 0]], bool)
    assert presence_strata(held, 3).tolist() == ["10"] * 6 + ["01"] * 3 + ["rare"] * 3
    # two rare images cannot fill 3 folds on their own: they go with the commonest pattern
    assert presence_strata(held[:11], 3).tolist() == ["10"] * 6 + ["01"] * 3 + ["10"] * 2


def test_folds_spread_every_pattern_and_keep_duplicate_groups_together(tmp_path):
    rng = np.random.default_rng(0)
    held = rng.random((90, 3)) < [0.5, 0.3, 0.1]
    ids = [f"images/{i}.png" for i in range(90)]
    # images 0-5 are three pairs of duplicates
    pd.DataFrame({"id": ids[:6], "group": ["a", "a", "b", "b", "c", "c"]}).to_csv(tmp_path / "clean.csv", index=False)
    groups = image_groups(ids, tmp_path / "clean.csv")
    strata = presence_strata(held, 3)
    fold = assign_folds(groups, strata, 3, seed=0, key="segment.folds.n_splits")
    assert fold[0] == fold[1] and fold[2] == fold[3] and fold[4] == fold[5]
    assert np.bincount(fold).min() >= 28
    for label in np.unique(strata):
        counts = np.bincount(fold[strata == label], minlength=3)
        assert counts.max() - counts.min() <= 2, (label, counts)
    for c in range(3):  # every class's images spread over the folds as well
        counts = np.bincount(fold[held[:, c]], minlength=3)
        assert counts.max() - counts.min() <= 3, (c, counts)
    assert (assign_folds(groups, strata, 3, seed=0) == fold).all()  # same seed, same folds


def test_too_few_groups_names_the_segment_key():
    with pytest.raises(PipelineError, match=r"segment.folds.n_splits=5 .* lower segment.folds.n_splits"):
        assign_folds(np.arange(3), np.array(["1", "1", "1"]), 5, 0, key="segment.folds.n_splits")
