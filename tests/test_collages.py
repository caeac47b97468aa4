import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.config import CompetitionConfig
from pipeline.data import collages
from pipeline.data.digits import solution_path

REPO = Path(__file__).resolve().parents[1]


def tree_digest(root):
    """Hash of every file under root (names and bytes)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def build(tmp_path, task, seed=0, name=None):
    out = tmp_path / (name or f"collages_{task}")
    return collages.build_collages(out, task, seed=seed, n_train=40, n_test=12)


def read(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.mark.parametrize("task", collages.TASKS)
def test_generation_is_deterministic(tmp_path, task):
    a, b = build(tmp_path / "a", task), build(tmp_path / "b", task)
    c = build(tmp_path / "c", task, seed=1)
    extras = [solution_path, collages.digits_path]
    assert tree_digest(a) == tree_digest(b) and tree_digest(a) != tree_digest(c)
    assert all(f(a).read_bytes() == f(b).read_bytes() for f in extras)


@pytest.mark.parametrize("task", collages.TASKS)
def test_labels_match_the_planted_digits(tmp_path, task):
    out = build(tmp_path, task)
    images, classes = collages._digits()
    drawn = read(collages.digits_path(out)).set_index("image")
    labels = pd.concat([read(out / "train.csv"), read(solution_path(out))]).set_index("image")["label"]
    assert sorted(labels.index) == sorted(drawn.index) and len(labels) == 52
    counts = set()
    for image, row in drawn.iterrows():
        src, cells = np.array(row["source"].split(), int), np.array(row["cells"].split(), int)
        assert classes[src].tolist() == [int(d) for d in row["digits"].split()]
        counts.add(len(src))
        pixels = np.asarray(Image.open(out / image))
        assert pixels.shape == (40, 40) and pixels.dtype == np.uint8
        for cell in range(4):  # each cell holds its source digit at some offset, or nothing
            block = pixels[(cell // 2) * 20:(cell // 2 + 1) * 20, (cell % 2) * 20:(cell % 2 + 1) * 20]
            if cell not in cells:
                assert not block.any()
                continue
            digit = images[src[list(cells).index(cell)]]
            assert any(np.array_equal(block[dy:dy + 16, dx:dx + 16], digit) for dy in range(5) for dx in range(5))
        if task == "multi_label":
            assert labels[image] == " ".join(sorted(set(row["digits"].split())))
        else:
            assert labels[image] == f"{sum(int(d) for d in row['digits'].split()):.1f}"
    assert counts == {1, 2, 3, 4}


def test_test_collages_use_only_test_digits(tmp_path):
    out = build(tmp_path, "multi_label")
    drawn = read(collages.digits_path(out))
    used = {s: set(" ".join(drawn.loc[drawn["split"] == s, "source"]).split()) for s in ("train", "test")}
    assert used["train"] and used["test"] and not used["train"] & used["test"]


@pytest.mark.parametrize("task", collages.TASKS)
def test_folder_contract_and_hidden_solution(tmp_path, task):
    out = build(tmp_path, task)
    train, test, sample, solution = (read(p) for p in (out / "train.csv", out / "test.csv",
                                                       out / "sample_submission.csv", solution_path(out)))
    assert list(train.columns) == ["image", "label"] and list(test.columns) == ["image"]
    assert list(sample.columns) == ["image", "label"] and list(solution.columns) == ["image", "label"]
    assert solution["image"].tolist() == test["image"].tolist() == sample["image"].tolist()
    assert not set(train["image"]) & set(test["image"]) and len(train) == 40 and len(test) == 12
    assert all((out / p).is_file() for p in pd.concat([train["image"], test["image"]]))
    assert sorted(p.name for p in out.iterdir()) == ["images", "sample_submission.csv", "test.csv", "train.csv"]
    if task == "multi_label":
        tags = {t for label in pd.concat([train["label"], solution["label"]]) for t in label.split(" ")}
        assert tags <= set("0123456789") and all(label for label in train["label"])
    else:
        values = pd.concat([train["label"], solution["label"]]).astype(float)
        assert values.between(0, 36).all() and values.nunique() > 10


@pytest.mark.parametrize("task", collages.TASKS)
def test_the_reader_accepts_the_folder(tmp_path, task):
    from pipeline.data.competition import read_competition
    out = build(tmp_path, task)
    comp = read_competition(out, CompetitionConfig(task=task))
    assert len(comp.train) == 40 and len(comp.test) == 12


def test_command_line(tmp_path, capsys):
    out = tmp_path / "r"
    collages.main(["--task", "regression", "--out", str(out), "--train", "8", "--test", "4"])
    assert len(read(out / "train.csv")) == 8 and len(read(solution_path(out))) == 4
    assert "regression competition of 40x40 images written to" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown collage task"):
        collages.build_collages(out, "ordinal")


def make_dry_run(*args):
    """The commands `make -n` would run for a target (a fresh .venv stamp is assumed: no install lines)."""
    cmd = ["make", "--no-print-directory", "-n", "-C", str(REPO), *args, f"INSTALLED={REPO / 'Makefile'}"]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()


def test_make_demo_targets():
    assert make_dry_run("demo")[-2:] == [  # without TASK: digits, as before
        ".venv/bin/python -m pipeline ensemble --data data/digits --config configs/digits.yaml ",
        ".venv/bin/python -m pipeline score submissions/digits.csv data/digits_solution.csv"]
    for task, metric in (("multi_label", "f1_samples"), ("regression", "rmse")):
        lines = make_dry_run("demo", f"TASK={task}")
        assert lines[-2:] == [
            f".venv/bin/python -m pipeline ensemble --data data/collages_{task} "
            f"--config configs/demo-{task.replace('_', '-')}.yaml ",
            f".venv/bin/python -m pipeline score submissions/collages_{task}.csv data/collages_{task}_solution.csv "
            f"--metric {metric}"]
        assert (REPO / f"configs/demo-{task.replace('_', '-')}.yaml").is_file()
        # the chain's own targets pick the demo's config for its folder
        assert "--config \"configs/demo-" + task.replace("_", "-") + ".yaml\"" in make_dry_run(
            "folds", f"DATA=data/collages_{task}")[-1]


def test_the_duplicate_search_leaves_distinct_collages_apart(tmp_path):
    """Perceptual hashes of mostly black grids key on which cells hold a digit (on these 200 collages they made 33
    pairs, 25 of them across labels); the collages are sparse, so the pixel-space search compares them instead, and
    it pairs none."""
    from pipeline.data import dedup
    from pipeline.data.dedup import find_pairs
    out = collages.build_collages(tmp_path / "c", "multi_label", n_train=200, n_test=0)
    train = read(out / "train.csv")
    feats = pd.DataFrame([dedup.image_features(str(out / p), 32) for p in train["image"]])
    assert feats["sparse"].all() and feats["phash"].isna().all()
    assert len(find_pairs(feats, 14, near=True)) == 0


def test_empty_collages(tmp_path):
    """min_digits=0: empty black canvases with target 0, one of the five counts."""
    out = collages.build_collages(tmp_path / "count", "regression", n_train=60, n_test=10, scale=3,
                                  regression_target="count", min_digits=0)
    train = read(out / "train.csv")
    empty = train[train["label"] == "0.0"]
    assert set(train["label"]) == {"0.0", "1.0", "2.0", "3.0", "4.0"} and len(empty) > 0
    assert all(not np.asarray(Image.open(out / image)).any() for image in empty["image"])


def test_the_bar_form_56px_collages_and_a_count_target(tmp_path):
    """--scale 3 --target count: issue 14's held-out form (56x56 collages of up to four ~28 px objects, the number
    of objects as the regression target)."""
    out = collages.build_collages(tmp_path / "count", "regression", n_train=30, n_test=10, scale=3,
                                  regression_target="count")
    drawn = read(collages.digits_path(out)).set_index("image")
    labels = pd.concat([read(out / "train.csv"), read(solution_path(out))]).set_index("image")["label"]
    for image, row in drawn.iterrows():
        assert labels[image] == f"{len(row['digits'].split()):.1f}"
        assert np.asarray(Image.open(out / image)).shape == (56, 56)
    assert set(labels) == {"1.0", "2.0", "3.0", "4.0"}
    with pytest.raises(ValueError, match="unknown regression target"):
        collages.build_collages(out, "regression", regression_target="mean")


@pytest.mark.slow
@pytest.mark.parametrize("task, target, metric",
                         [("multi_label", "sum", "f1_samples"), ("regression", "count", "rmse")])
def test_the_bar_form_runs_folds_train_ensemble(tmp_path, capsys, task, target, metric):
    # A count of 1-4 reads as four classes under task auto (it says so and names the override): the count bar's
    # documented override is competition.task=regression.
    """Both bars' data forms end to end through the CLI; tiny sizes: the scores are checked to exist, the bars
    themselves in the docs."""
    from pipeline.cli import main
    from pipeline.scoring.submission import score_file
    data = collages.build_collages(tmp_path / "comp", task, n_train=48, n_test=12, scale=3, regression_target=target)
    work, subs = tmp_path / "work", tmp_path / "subs"
    args = ["--data", str(data), "--work", str(work), "--submissions", str(subs),
            "folds.n_splits=2", "model.backbones=[resnet10t]", "train.epochs=1", "train.image_size=32",
            "train.batch_size=16", "train.hflip=false", "predict.tta=[identity]", "runtime.device=cpu",
            "runtime.threads=1", "clean.workers=1", "tracking.backend=none", f"competition.task={task}"]
    for stage in ("folds", "train", "ensemble"):
        assert main([stage, *args]) == 0
    printed = capsys.readouterr().out
    assert f"honest CV {metric}" in printed
    oof = pd.read_parquet(work / "runs" / "resnet10t" / "oof.parquet")
    assert ("pred" in oof.columns) == (task == "regression") and len(oof) == 48
    score = score_file(subs / "comp.csv", solution_path(data), metric)
    assert 0 <= score <= (1 if metric == "f1_samples" else 4)
