import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.context import Context
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.data import splits
from pipeline.stages import clean, folds

from .conftest import write_competition


def _ctx(data: Path, tmp_path: Path, *overrides: str) -> Context:
    return Context(load_config(None, list(overrides)), data, tmp_path / "work")


def _add_train_rows(data: Path, rows: list[tuple[str, str]]) -> None:
    frame = pd.read_csv(data / "train.csv", dtype=str)
    pd.concat([frame, pd.DataFrame(rows, columns=["image", "label"])]).to_csv(data / "train.csv", index=False)


def _planted(tmp_path: Path) -> Path:
    data = write_competition(tmp_path / "comp", n_per_class=5)
    shutil.copy(data / "img/cat_0.png", data / "img/cat_copy.png")         # same label: a plain duplicate
    shutil.copy(data / "img/cat_1.png", data / "img/cat_1_as_dog.png")     # same pixels, other label: conflict
    gray = np.random.default_rng(5).integers(0, 255, (9, 9), dtype=np.uint8)
    Image.fromarray(gray).save(data / "img/gray.png")
    Image.fromarray(np.dstack([gray] * 3)).save(data / "img/gray_as_rgb.png")  # same pixels, other mode
    _add_train_rows(data, [("img/cat_copy.png", "cat"), ("img/cat_1_as_dog.png", "dog"), ("img/gray.png", "dog"),
                           ("img/gray_as_rgb.png", "dog")])
    return data


def test_exact_duplicates_and_conflicts_are_found(tmp_path: Path):
    ctx = _ctx(_planted(tmp_path), tmp_path)
    summary = clean.run(ctx)
    kept = pd.read_csv(ctx.work_dir / "clean.csv", dtype=str)
    dropped = pd.read_csv(ctx.work_dir / "dropped.csv", dtype=str)
    pairs = pd.read_csv(ctx.work_dir / "duplicates.csv", dtype=str)
    assert summary["exact_pairs"] == 3 and summary["conflicts_dropped"] == 2 and summary["near_pairs"] == 0
    assert not kept["id"].isin(["img/cat_1.png", "img/cat_1_as_dog.png"]).any()
    assert dropped.set_index("id").loc["img/cat_copy.png", "reason"].startswith("exact duplicate")
    assert set(pairs["id_b"]) == {"img/cat_copy.png", "img/cat_1_as_dog.png", "img/gray_as_rgb.png"}
    assert not summary["all_gray"]


def test_majority_policy_keeps_the_majority_label(tmp_path: Path):
    data = _planted(tmp_path)
    shutil.copy(data / "img/cat_1.png", data / "img/cat_1_again.png")
    _add_train_rows(data, [("img/cat_1_again.png", "cat")])
    ctx = _ctx(data, tmp_path, "clean.conflicts=majority")
    clean.run(ctx)
    kept = pd.read_csv(ctx.work_dir / "clean.csv", dtype=str).set_index("id")
    assert kept.loc["img/cat_1.png", "label"] == "cat" and "img/cat_1_as_dog.png" not in kept.index


def test_unreadable_train_image_is_dropped_and_unreadable_test_image_is_an_error(tmp_path: Path):
    data = write_competition(tmp_path / "comp")
    (data / "img/cat_2.png").write_bytes(b"")
    ctx = _ctx(data, tmp_path)
    assert clean.run(ctx)["unreadable"] == 1
    assert "cannot decode" in pd.read_csv(ctx.work_dir / "dropped.csv")["reason"].iloc[0]
    (data / "img/test_1.png").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match=r"test.csv line 3: .*test_1.png: cannot decode image"):
        clean.run(ctx)


def test_clean_skips_when_nothing_changed_and_reruns_when_an_image_changes(tmp_path: Path):
    data = write_competition(tmp_path / "comp")
    ctx = _ctx(data, tmp_path)
    assert not clean.run(ctx).get("skipped")
    assert clean.run(_ctx(data, tmp_path)).get("skipped")
    Image.new("RGB", (5, 5), "red").save(data / "img/cat_3.png")
    assert not clean.run(_ctx(data, tmp_path)).get("skipped")


def _grouped_frame(n_groups: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_groups)
    group = np.repeat(np.arange(n_groups), sizes)
    y = rng.integers(0, 3, n_groups)[group]
    return pd.DataFrame({"group": group, "y": y})


def test_folds_keep_every_duplicate_group_in_one_fold():
    frame = _grouped_frame()
    frame["fold"] = splits.assign_folds(frame, 5, seed=1)
    assert (frame.groupby("group")["fold"].nunique() == 1).all()
    report = splits.fold_report(frame)
    assert report["groups_spanning_folds"] == 0 and sum(report["sizes"]) == len(frame)
    assert report["max_class_share_deviation"] < 0.1


def test_same_seed_same_folds_other_seed_other_folds():
    frame = _grouped_frame()
    a, b, c = (splits.assign_folds(frame, 5, s) for s in (1, 1, 2))
    assert (a == b).all() and not (a == c).all()


def test_too_many_folds_for_the_data():
    with pytest.raises(PipelineError, match=r"only 3 independent groups .*: set folds.n_splits=3 or fewer"):
        splits.assign_folds(_grouped_frame(3), 5, 0)


def test_folds_stage_writes_folds_and_hash(small_digits: Path, tmp_path: Path):
    ctx = _ctx(small_digits, tmp_path, "folds.n_splits=3")
    clean.run(ctx)  # its upstream stage (pipeline/orchestrate.py chains them)
    out = folds.run(ctx)
    frame = pd.read_csv(ctx.work_dir / "folds.csv")
    assert sorted(frame["fold"].unique()) == [0, 1, 2] and len(out["folds_hash"]) == 16
    assert folds.run(_ctx(small_digits, tmp_path, "folds.n_splits=3"))["skipped"]
