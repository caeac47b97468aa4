"""The segment stage end to end on a tiny generated competition: folds, two fold models, OOF and test maps, views
and post-processing chosen on OOF (nested), a submission that validates, and a rerun that trains nothing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.context import Context
from pipeline.core.config import load_config
from pipeline.data.table import read_table
from pipeline.segmentation.generate import CLASSES, build_masks, solution_path
from pipeline.segmentation.submit import score_masks, validate_segmentation
from pipeline.stages.segment import read_data

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_segment_stage_submits_scores_nested_and_skips_finished_work(tmp_path, capsys):
    data_dir = build_masks(tmp_path / "masks", n_train=24, n_test=8, seed=1, size=64)
    work, subs = tmp_path / "work", tmp_path / "subs"
    args = ["segment", "--data", str(data_dir), "--work", str(work), "--submissions", str(subs),
            "runtime.threads=1", "segment.train.image_size=32", "segment.train.epochs=2",
            "segment.train.batch_size=8", "segment.folds.n_splits=2", "segment.predict.gallery_images=3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("segment: epoch") == 4  # 2 folds x 2 epochs
    root = work / "segment"
    folds = pd.read_csv(root / "folds.csv")
    assert len(folds) == 24 and sorted(folds["fold"].unique()) == [0, 1]
    for k in (0, 1):
        member = root / "unet-r18"  # the one default member's folder
        history = pd.read_csv(member / f"fold{k}" / "history.csv")
        assert history["epoch"].tolist() == [1, 2] and history["val_dice"].between(0, 1).all()
        oof = np.load(member / f"fold{k}" / "oof_views.npy")
        assert oof.shape == ((folds["fold"] == k).sum(), 2, 3, 32, 32) and oof.dtype == np.uint8  # plain, hflip
        assert np.load(member / f"fold{k}" / "test.npy").shape == (8, 3, 32, 32)
        assert json.loads((member / f"fold{k}" / "mlflow.json").read_text())["run_id"]  # the fold's MLflow run
    oof_all = np.load(root / "oof.npy")
    assert oof_all.shape == (24, 3, 32, 32) and oof_all.any()
    assert not list(root.glob(".*tmp*"))  # no temp files left behind
    metrics = json.loads((root / "metrics.json").read_text())
    (single,) = metrics["members"]  # views are chosen per member
    assert single["views"] in (["identity"], ["identity", "hflip"]) and metrics["weights"] == {"unet-r18": 1.0}
    assert single["view_scores"]["+".join(single["views"])] == max(single["view_scores"].values())
    # chosen on all of OOF, so at least as high as on any fold with the choice of the other fold
    assert 0 <= metrics["nested_dice"] <= metrics["oof_dice_chosen"] <= 1
    assert metrics["oof_dice_chosen"] >= metrics["oof_dice_0.5"] - 1e-6  # (0.5, 0) is in the default grid
    assert set(metrics["thresholds"]) == set(CLASSES)
    board = pd.read_csv(root / "leaderboard.csv")
    assert board["part"].tolist() == ["fold0", "fold1", "OOF", "OOF", "OOF"]
    honest = board[(board["part"] == "OOF") & (board["scoring"] == "nested (honest)")]
    assert honest["dice"].iloc[0] == pytest.approx(metrics["nested_dice"])
    with Image.open(root / "gallery_oof.png") as im:
        assert im.width >= 400 and im.height >= 400  # 3 rows of image, truth, prediction
    sub = read_table(subs / "masks.csv")
    assert list(sub.columns) == ["ImageId", *CLASSES] and len(sub) == 8
    data = read_data(Context(load_config(None), data_dir, resolve=False))
    validate_segmentation(sub, "masks.csv", data)
    score = score_masks(sub, read_table(solution_path(data_dir)), data)["dice"]
    assert 0 <= score <= 1
    manifest = json.loads((subs / "masks.manifest.json").read_text())
    assert manifest["track"] == "segmentation" and manifest["nested_dice"] == metrics["nested_dice"]

    # the same command: both models and their maps are up to date, nothing trains
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "segment: epoch" not in printed and printed.count("model up to date") == 2
    # a post-processing grid reads only the stored maps: no training, a new choice
    assert main([*args, "segment.thresholds.probability=[0.5]", "segment.thresholds.min_area=[0]"]) == 0
    printed = capsys.readouterr().out
    assert "segment: epoch" not in printed
    again = json.loads((root / "metrics.json").read_text())
    assert set(again["thresholds"].values()) == {0.5} and again["oof_dice_chosen"] == pytest.approx(
        again["oof_dice_0.5"], abs=1e-6)
    # the CLI's checks agree
    assert main(["validate-submission", "--track", "segmentation", str(subs / "masks.csv"), "--data",
                 str(data_dir)]) == 0
    assert main(["score-masks", str(subs / "masks.csv"), str(solution_path(data_dir)), "--data", str(data_dir)]) == 0
    assert "score: mean Dice" in capsys.readouterr().out


def test_make_demo_segmentation_and_segment_targets():
    def dry_run(*args: str) -> list[str]:
        cmd = ["make", "--no-print-directory", "-n", "-C", str(REPO), *args, f"INSTALLED={REPO / 'Makefile'}",
               f"MASKS={REPO / 'no-such-folder'}"]
        lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()
        # the install recipe shows too when pyproject.toml or constraints.txt is newer than the stamp: not ours
        return [line for line in lines if " -m pipeline " in line]

    masks = REPO / "no-such-folder"
    assert dry_run("demo", "TASK=segmentation") == [
        f".venv/bin/python -m pipeline make-masks --out {masks} --train 240 --test 60",
        f".venv/bin/python -m pipeline segment --data {masks} --config configs/demo-segmentation.yaml ",
        f".venv/bin/python -m pipeline score-masks submissions/no-such-folder.csv {masks}_solution.csv --data {masks}"]
    lines = dry_run("segment", "DATA=comp", "OVERRIDES=segment.folds.n_splits=3")
    assert lines[0].split() == ['.venv/bin/python', '-m', 'pipeline', 'segment', '--data', '"comp"', '--submissions',
                                '"submissions"', "segment.folds.n_splits=3"]


def test_segment_config_keys_are_checked():
    cfg = load_config(REPO / "configs" / "demo-segmentation.yaml", ["segment.train.epochs=3"])
    assert cfg.segment.train.epochs == 3 and cfg.segment.folds.n_splits == 2 and cfg.segment.views.vflip
    with pytest.raises(Exception, match=r"segment.train.epoch.*did you mean 'segment.train.epochs'"):
        load_config(None, ["segment.train.epoch=3"])
    with pytest.raises(Exception, match="segment.models.0.arch"):
        load_config(None, ["segment.models=[{arch: transformer}]"])
    # the one-network key of before is an error that shows the list form
    with pytest.raises(Exception, match=r"unknown config key 'segment.model.arch' \(segment.model became "
                                        r"segment.models, a list of members: segment.models=\[\{name: unet-r18"):
        load_config(None, ["segment.model.arch=fpn"])
    cfg = load_config(None, ["segment.models=[{arch: fpn, encoder: tu-resnet10t}, {name: u, arch: unet}]"])
    assert [m.label for m in cfg.segment.models] == ["fpn-tu-resnet10t", "u"]
    with pytest.raises(Exception, match=r"segment.models\[1\]: name 'U' is also segment.models\[0\]'s"):
        load_config(None, ["segment.models=[{name: u}, {name: U}]"])


@pytest.mark.slow
def test_segment_blends_members_and_retrains_only_the_member_that_changed(tmp_path, capsys):
    data_dir = build_masks(tmp_path / "masks", n_train=24, n_test=8, seed=2, size=64)
    work, subs = tmp_path / "work", tmp_path / "subs"
    base = ["segment", "--data", str(data_dir), "--work", str(work), "--submissions", str(subs),
            "runtime.threads=1", "tracking.backend=none", "segment.train.image_size=32", "segment.train.epochs=2",
            "segment.train.batch_size=8", "segment.folds.n_splits=2", "segment.predict.gallery_images=0",
            "segment.blend.steps=4"]
    unet = "{name: unet-r18, arch: unet, encoder: resnet18}"
    assert main([*base, f"segment.models=[{unet}]"]) == 0
    assert capsys.readouterr().out.count("segment: epoch") == 4  # 1 member x 2 folds x 2 epochs

    # a second member: only it trains; the first one's models are kept
    assert main([*base, f"segment.models=[{unet}, {{name: fpn-b, arch: fpn, encoder: tu-resnet10t}}]"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("segment: epoch") == 4
    assert printed.count("unet-r18/fold0 model up to date") == 1 and printed.count("model up to date") == 2
    root = work / "segment"
    metrics = json.loads((root / "metrics.json").read_text())
    names = [m["name"] for m in metrics["members"]]
    assert names == ["unet-r18", "fpn-b"]
    assert set(metrics["weights"]) == set(names) and sum(metrics["weights"].values()) == pytest.approx(1)
    alone = [m["oof_dice_0.5"] for m in metrics["members"]]
    # each member alone is a candidate, so the chosen blend is at least as good on OOF at 0.5 as either
    assert metrics["oof_dice_0.5"] >= max(alone) - 1e-9
    assert len(metrics["candidates"]) == 5  # each alone, the mean, and 1/4, 3/4 (steps 4)
    assert metrics["oof_dice_0.5"] == pytest.approx(max(c["oof_dice_0.5"] for c in metrics["candidates"]))
    assert set(metrics["nested_weights"]) == {"fold0", "fold1"}
    assert 0 <= metrics["nested_dice"] <= 1 and metrics["oof_dice_chosen"] >= metrics["oof_dice_0.5"] - 1e-6
    board = pd.read_csv(root / "leaderboard.csv")
    assert board["part"].tolist() == ["fold0", "fold1", "unet-r18", "unet-r18", "fpn-b", "fpn-b", "OOF", "OOF", "OOF"]
    member_rows = board[board["part"] == "fpn-b"].set_index("scoring")["dice"]
    assert member_rows["threshold 0.5"] == pytest.approx(alone[1])
    assert member_rows["nested (honest)"] == pytest.approx(metrics["members"][1]["nested_dice"])
    # test maps only for the members the blend uses
    for name, w in metrics["weights"].items():
        assert (root / name / "fold1" / "test.npy").exists() == (w > 0), name
    manifest = json.loads((subs / "masks.manifest.json").read_text())
    assert [m["name"] for m in manifest["members"]] == names and manifest["weights"] == metrics["weights"]
    sub = read_table(subs / "masks.csv")
    validate_segmentation(sub, "masks.csv", read_data(Context(load_config(None), data_dir, resolve=False)))
    assert not list(root.rglob(".*tmp*"))

    # the second member changed: it alone retrains
    assert main([*base, f"segment.models=[{unet}, {{name: fpn-b, arch: fpn, encoder: resnet18}}]"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("segment: epoch") == 4 and "fpn-b/fold0 model up to date" not in printed
    assert all(printed.count(f"unet-r18/fold{k} model up to date") == 1 for k in (0, 1))
    assert json.loads((root / "metrics.json").read_text())["members"][1]["encoder"] == "resnet18"
