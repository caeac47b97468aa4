"""Segmentation submissions: built in the sample submission's form (wide, long, combined), refused with one line
naming the row and column when they are wrong, and scored against the hidden solution by mean Dice."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import CompetitionConfig
from pipeline.core.errors import PipelineError
from pipeline.data.table import read_table
from pipeline.segmentation.data import read_segmentation
from pipeline.segmentation.generate import CLASSES, build_masks, solution_path
from pipeline.segmentation.submit import build_frame, read_cells, score_masks, validate_segmentation


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_masks(tmp_path_factory.mktemp("seg") / "masks", n_train=6, n_test=4, seed=3, size=32)


def solution_rles(folder: Path) -> dict[tuple[str, str], str]:
    solution = read_table(solution_path(folder))
    return {(i, c): rle for c in CLASSES for i, rle in zip(solution["ImageId"], solution[c], strict=True)}


def with_sample(folder: Path, tmp_path: Path, sample: pd.DataFrame) -> Path:
    """A copy of the folder with another sample submission."""
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    sample.to_csv(copy / "sample_submission.csv", index=False)
    return copy


def test_wide_submission_round_trip_validates_and_scores_one(folder):
    data = read_segmentation(folder, CompetitionConfig())
    frame = build_frame(data, solution_rles(folder))
    assert list(frame.columns) == ["ImageId", *CLASSES] and frame["ImageId"].tolist() == data.test.ids
    validate_segmentation(frame, "sub.csv", data)
    solution = read_table(solution_path(folder))
    assert score_masks(frame, solution, data)["dice"] == 1.0
    empty = build_frame(data, {(i, c): "" for i in data.test.ids for c in CLASSES})
    truth_empty = np.mean([rle == "" for c in CLASSES for rle in solution[c]])
    scores = score_masks(empty, solution, data)
    assert scores["dice"] == pytest.approx(truth_empty) and scores["dice"] < 1
    assert set(scores["per_class"]) == set(CLASSES)


def test_validation_names_the_problem(folder):
    data = read_segmentation(folder, CompetitionConfig())
    good = build_frame(data, solution_rles(folder))
    with pytest.raises(PipelineError, match=r"sub.csv: columns \['ImageId', 'disc', 'bar'\]; this competition's"):
        validate_segmentation(good[["ImageId", "disc", "bar"]], "sub.csv", data)
    with pytest.raises(PipelineError, match=r"sub.csv: 3 rows, expected 4 \(one per test image\)"):
        validate_segmentation(good.iloc[:3], "sub.csv", data)
    swapped = good.iloc[[1, 0, 2, 3]].reset_index(drop=True)
    with pytest.raises(PipelineError, match=r"sub.csv line 2: \['images/test_00001.png'\] where "
                                            r"\['images/test_00000.png'\] is expected"):
        validate_segmentation(swapped, "sub.csv", data)
    bad = good.copy()
    bad.loc[2, "bar"] = "1020 10"  # past the end of a 32 x 32 image
    with pytest.raises(PipelineError, match=r"sub.csv line 4, column bar: run-length encoding run 1 \(1020 10\) "
                                            r"ends at pixel 1029, out of range for a 32x32 image"):
        validate_segmentation(bad, "sub.csv", data)
    bad.loc[2, "bar"] = "1 2 3"
    with pytest.raises(PipelineError, match="line 4, column bar: run-length encoding has an odd number"):
        validate_segmentation(bad, "sub.csv", data)


def test_long_and_combined_forms_follow_the_sample(folder, tmp_path):
    ids = read_table(folder / "test.csv")["ImageId"].tolist()
    pairs = [(i, c) for c in reversed(CLASSES) for i in ids]  # an order of the sample's own
    long = pd.DataFrame({"ImageId": [i for i, _ in pairs], "ClassId": [c for _, c in pairs], "EncodedPixels": ""})
    data = read_segmentation(with_sample(folder, tmp_path, long), CompetitionConfig())
    assert data.submission_form == "long"
    frame = build_frame(data, solution_rles(folder))
    assert list(frame.columns) == ["ImageId", "ClassId", "EncodedPixels"] and len(frame) == 12
    assert frame[["ImageId", "ClassId"]].apply(tuple, axis=1).tolist() == pairs
    validate_segmentation(frame, "sub.csv", data)
    assert score_masks(frame, read_table(solution_path(folder)), data)["dice"] == 1.0
    cells = read_cells(frame, "ImageId", CLASSES, "sub.csv")
    assert cells[(ids[0], "bar")] == [solution_rles(folder)[(ids[0], "bar")]]
    with pytest.raises(PipelineError, match="one per test image and class"):
        validate_segmentation(frame.iloc[1:], "sub.csv", data)


def test_combined_form(folder, tmp_path):
    ids = read_table(folder / "test.csv")["ImageId"].tolist()
    combined = pd.DataFrame({"Image_Label": [f"{i}_{c}" for i in ids for c in CLASSES], "EncodedPixels": ""})
    data = read_segmentation(with_sample(folder, tmp_path, combined), CompetitionConfig())
    assert data.submission_form == "combined"
    frame = build_frame(data, solution_rles(folder))
    assert list(frame.columns) == ["Image_Label", "EncodedPixels"]
    assert frame["Image_Label"].tolist() == combined["Image_Label"].tolist()
    validate_segmentation(frame, "sub.csv", data)
    assert score_masks(frame, read_table(solution_path(folder)), data)["dice"] == 1.0
