"""Detection submissions go through the writer classification uses: checked, atomic, manifest, history copy."""

import json
from functools import partial
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.core.errors import PipelineError
from pipeline.detection.bananas import build_bananas
from pipeline.scoring.submission import validate_detection, write_submission

IMAGES = ["images/a.png", "images/b.png", "images/c.png"]
STRINGS = ["banana 0.9 1 2 30 40 banana 0.2 5 5 9 9", "", "banana 0.5 0 0 10 10"]
GOOD = pd.DataFrame({"image": IMAGES, "PredictionString": STRINGS})


def test_a_valid_detection_submission_passes():
    validate_detection(GOOD, "sub.csv", IMAGES, ["banana"])


@pytest.mark.parametrize("mutate, pattern", [
    (lambda f: f.rename(columns={"PredictionString": "boxes"}), r"sub\.csv: columns \['image', 'boxes'\]"),
    (lambda f: f.iloc[:2], r"sub\.csv: images differ from the test set \(1 missing, e.g. \['images/c.png'\]"),
    (lambda f: pd.concat([f, f.iloc[:1]], ignore_index=True), r"sub\.csv line 5: image 'images/a.png' listed twice"),
    (lambda f: f.assign(image=["images/a.png", "images/b.png", "images/x.png"]), r"1 extra, e.g. \['images/x.png'\]"),
    (lambda f: f.assign(PredictionString=["banana 0.9 1 2 30", "", ""]), r"sub\.csv line 2: .* needs groups of 6"),
    (lambda f: f.assign(PredictionString=["", "apple 0.9 1 2 3 4", ""]), r"sub\.csv line 3: unknown label 'apple'"),
    (lambda f: f.assign(PredictionString=["", "", "banana high 1 2 3 4"]), r"sub\.csv line 4: .* not a number"),
    (lambda f: f.assign(PredictionString=["", "", "banana 0.5 1 2 nan 4"]), r"sub\.csv line 4: .* not finite"),
])
def test_a_bad_detection_submission_is_one_line_naming_the_row(mutate, pattern):
    with pytest.raises(PipelineError, match=pattern):
        validate_detection(mutate(GOOD), "sub.csv", IMAGES, ["banana"])


def test_the_writer_refuses_a_bad_frame_and_keeps_the_last_good_submission(tmp_path: Path):
    check = partial(validate_detection, images=IMAGES, classes=["banana"])
    path = write_submission(GOOD, tmp_path, "bananas", {"track": "detection"}, check)
    assert path == tmp_path / "bananas.csv"
    assert pd.read_csv(path, keep_default_na=False).equals(GOOD)
    manifest = json.loads((tmp_path / "bananas.manifest.json").read_text())
    assert manifest["track"] == "detection" and manifest["rows"] == 3
    copies = list((tmp_path / "history").iterdir())
    assert len(copies) == 1 and copies[0].read_bytes() == path.read_bytes()
    with pytest.raises(PipelineError, match=r"bananas\.csv: images differ"):
        write_submission(GOOD.iloc[:2], tmp_path, "bananas", {"track": "detection"}, check)
    assert pd.read_csv(path, keep_default_na=False).equals(GOOD) and len(list((tmp_path / "history").iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bananas.csv", "bananas.manifest.json", "history"]


@pytest.mark.slow
def test_the_detect_stage_writes_a_manifest_and_a_history_copy_per_new_submission(tmp_path: Path, capsys):
    data = build_bananas(tmp_path / "bananas", n_train=8, n_val=4, n_test=4, seed=1)
    subs = tmp_path / "subs"
    args = ["detect", "--data", str(data), "--work", str(tmp_path / "work"), "--submissions", str(subs),
            "detect.folds.n_splits=1",
            "detect.train.image_size=64", "detect.train.epochs=1", "detect.train.batch_size=4",
            "detect.predict.gallery_images=0", "detect.evaluate.tta=none"]
    assert main(args) == 0
    manifest = json.loads((subs / "bananas.manifest.json").read_text())
    metrics = json.loads((tmp_path / "work" / "detect" / "metrics.json").read_text())
    assert manifest["track"] == "detection" and manifest["rows"] == 4 and manifest["classes"] == ["banana"]
    assert manifest["val_map_50"] == metrics["map_50"] and manifest["score_threshold"] == 0.05
    assert len(list((subs / "history").iterdir())) == 1
    assert main(args) == 0 and "predictions up to date" in capsys.readouterr().out  # nothing new: no new copy
    assert len(list((subs / "history").iterdir())) == 1
    assert main([*args, "detect.predict.score_threshold=0.5"]) == 0
    assert len(list((subs / "history").iterdir())) == 2
    assert json.loads((subs / "bananas.manifest.json").read_text())["score_threshold"] == 0.5
