"""Detection folder contract: what is read, and one-line errors for what is wrong."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.core.config import CompetitionConfig, DetectDataConfig
from pipeline.core.errors import PipelineError
from pipeline.detection.data import box_targets, decoded, read_detection

HEADER = ["image", "label", "xmin", "ymin", "xmax", "ymax"]


def _folder(root: Path, rows: list[list], test: list[str] | None = None, val: list[list] | None = None,
            size=(200, 100)) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    names = {r[0] for r in rows} | set(test or ["img/t0.png"]) | {r[0] for r in val or []}
    for name in names:
        Image.new("RGB", size, (90, 120, 30)).save(root / name)
    pd.DataFrame(rows, columns=HEADER).to_csv(root / "train.csv", index=False)
    if val is not None:
        pd.DataFrame(val, columns=HEADER).to_csv(root / "val.csv", index=False)
    pd.DataFrame({"image": test or ["img/t0.png"]}).to_csv(root / "test.csv", index=False)
    return root


def _read(root: Path, **cfg):
    return read_detection(root, DetectDataConfig(**cfg), CompetitionConfig(), seed=0)


def test_boxes_are_grouped_per_image_normalised_and_padded(tmp_path):
    rows = [["img/a.png", "cat", 10, 20, 110, 70], ["img/a.png", "dog", 0, 0, 200, 100],
            ["img/b.png", "", "", "", "", ""], ["img/c.png", "cat", 50, 25, 150, 75]]
    data = _read(_folder(tmp_path, rows, val=[["img/v.png", "dog", 0, 0, 20, 10]]))
    assert data.classes == ["cat", "dog"] and data.val_source == "val.csv"
    targets = box_targets(data.train, data.classes)
    assert targets.shape == (3, 2, 5)  # b.png has no objects: padding only
    assert torch.allclose(targets[0], torch.tensor([[0, 0.05, 0.2, 0.55, 0.7], [1, 0, 0, 1, 1]]))
    assert (targets[1, :, 0] == -1).all()
    assert targets[2, 0].tolist() == pytest.approx([0, 0.25, 0.25, 0.75, 0.75]) and targets[2, 1, 0] == -1
    images = decoded(data.train, tmp_path / "cache", 64, "t")
    assert images.shape == (3, 3, 64, 64) and images.dtype.is_floating_point is False
    assert images[0, :, 0, 0].tolist() == [90, 120, 30]


def test_without_val_csv_a_seeded_share_of_images_is_held_out(tmp_path):
    rows = [[f"img/{i}.png", "cat", 1, 1, 9, 9] for i in range(20)]
    root = _folder(tmp_path, rows)
    a, b = _read(root, val_fraction=0.25), _read(root, val_fraction=0.25)
    assert len(a.val.images) == 5 and len(a.train.images) == 15 and a.val_source == "25% of train.csv"
    assert a.val.images["image"].tolist() == b.val.images["image"].tolist()
    assert not set(a.val.images["image"]) & set(a.train.images["image"])
    assert len(a.val.boxes) == 5 and a.val.boxes["item"].tolist() == list(range(5))


def test_exif_rotation_swaps_the_size_used_for_boxes(tmp_path):
    root = _folder(tmp_path, [["img/a.jpg", "cat", 0, 0, 100, 200], ["img/b.png", "cat", 0, 0, 10, 10]],
                   val=[["img/v.png", "cat", 0, 0, 5, 5]])
    im = Image.new("RGB", (200, 100))
    exif = im.getexif()
    exif[0x0112] = 6  # stored 200 x 100, shown rotated: 100 wide, 200 high
    im.save(root / "img/a.jpg", exif=exif)
    data = _read(root)
    assert data.train.images.loc[0, ["width", "height"]].tolist() == [100, 200]
    assert box_targets(data.train, data.classes)[0, 0].tolist() == [0, 0, 0, 1, 1]


@pytest.mark.parametrize(("rows", "message"), [
    ([["img/a.png", "cat", 10, 10, 5, 20]], "train.csv line 2: box [10.0, 10.0, 5.0, 20.0] has xmin >= xmax"),
    ([["img/a.png", "cat", 0, 0, 10, 10], ["img/a.png", "cat", 150, 50, 201, 90]],
     "train.csv line 3: box [150.0, 50.0, 201.0, 90.0] lies outside its image (200x100"),
    ([["img/a.png", "cat", "x", 0, 10, 10]], "train.csv line 2: xmin 'x' is not a number"),
    ([["img/a.png", "cat", 1, 1, "", 10]], "train.csv line 2: incomplete box row; give all four"),
    ([["img/a.png", "", 1, 1, 5, 10]], "train.csv line 2: incomplete box row; a box needs a label"),
    ([["img/a.png", "big cat", 1, 1, 5, 10]], "label 'big cat' contains a space"),
    ([["img/a.png", "cat", 1, 1, 5, 10], ["img/missing.png", "cat", 1, 1, 5, 10]],
     "train.csv line 3: image 'img/missing.png' not found"),
    ([["../a.png", "cat", 1, 1, 5, 10]], "leads outside the competition folder"),
])
def test_bad_rows_get_one_line_errors_naming_file_and_line(tmp_path, rows, message):
    names = [r for r in rows if not r[0].startswith("../") and "missing" not in r[0]]
    root = _folder(tmp_path, names or [["img/a.png", "cat", 1, 1, 5, 10]], val=[["img/v.png", "cat", 0, 0, 5, 5]])
    pd.DataFrame(rows, columns=HEADER).to_csv(root / "train.csv", index=False)
    with pytest.raises(PipelineError) as err:
        _read(root)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_folder_level_errors(tmp_path):
    root = _folder(tmp_path, [["img/a.png", "cat", 1, 1, 5, 10]], val=[["img/v.png", "dog", 0, 0, 5, 5]])
    with pytest.raises(PipelineError, match="label 'dog' never occurs in train.csv"):
        _read(root)
    pd.DataFrame({"image": ["img/t0.png", "img/t0.png"]}).to_csv(root / "test.csv", index=False)
    (root / "val.csv").unlink()
    with pytest.raises(PipelineError, match="too few to hold out"):
        _read(root)
    pd.DataFrame({"image": ["img/a.png"], "xmin": [1]}).to_csv(root / "train.csv", index=False)
    with pytest.raises(PipelineError, match=r"missing column\(s\) \['label', 'ymin', 'xmax', 'ymax'\]"):
        _read(root)
    pd.DataFrame([["img/a.png", "cat", 1, 1, 5, 10], ["img/t0.png", "cat", 1, 1, 5, 10]],
                 columns=HEADER).to_csv(root / "train.csv", index=False)
    with pytest.raises(PipelineError, match="test.csv line 3: duplicate image 'img/t0.png'"):
        _read(root, val_fraction=0.5)
