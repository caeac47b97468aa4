"""Extra data (competition.extra): more labelled folders that only ever add training rows.

The extra rows get fold -1 in folds.csv: never a validation fold, never an OOF row, in every fold's
training set. The clean stage screens them against the competition's rows: a copy of a test image is
a leak (dropped unless clean.keep_extra_leaks=true), a copy of a training image is dropped (the
training row stays). Bad folders are one-line errors, and the folders are never written to.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.context import Context
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.stages import clean, folds, predict
from pipeline.stages import train as train_stage
from pipeline.training import fold as fold_module

from .conftest import natural_image, tiny, write_competition

FAST = tiny()


def _ctx(data: Path, work: Path, *overrides: str) -> Context:
    return Context(load_config(None, [*FAST, *overrides]), data, work)


def _extra(root: Path, rows: list[tuple[str, str]], seed: int = 1) -> Path:
    """An extra folder: train.csv with the competition's columns, a fresh random image per row unless present."""
    rng = np.random.default_rng(seed)
    (root / "more").mkdir(parents=True, exist_ok=True)
    for name, _ in rows:
        if not (root / name).exists():
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / name)
    pd.DataFrame(rows, columns=["image", "label"]).to_csv(root / "train.csv", index=False)
    return root


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"id": str, "label": str, "source": str}, keep_default_na=False)


@pytest.fixture
def comp(tmp_path: Path) -> Path:
    return write_competition(tmp_path / "comp", n_per_class=6)


@pytest.fixture
def extra(tmp_path: Path) -> Path:
    return _extra(tmp_path / "extra1", [(f"more/x_{i}.png", "cat" if i % 2 else "dog") for i in range(6)])


def test_extra_rows_get_fold_minus_one_and_the_competition_folds_do_not_move(comp: Path, extra: Path, tmp_path: Path):
    plain = _ctx(comp, tmp_path / "plain")
    clean.run(plain)
    folds.run(plain)
    ctx = _ctx(comp, tmp_path / "work", f"competition.extra=[{extra}]")
    summary = clean.run(ctx)
    assert (summary["extra_rows"], summary["extra_kept"], summary["extra_leaks"]) == (6, 6, 0)
    stats = folds.run(ctx)
    table = _read(ctx.work_dir / "folds.csv")
    extra_ids = {f"more/x_{i}.png" for i in range(6)}
    assert set(table.loc[table["fold"] == -1, "id"]) == extra_ids
    assert set(table.loc[table["source"] != "", "id"]) == extra_ids
    assert set(table["fold"]) == {-1, 0, 1} and stats["extra_rows"] == 6
    for k in (0, 1):
        assert not extra_ids & set(table.loc[table["fold"] == k, "id"])
    own = table[table["fold"] >= 0].set_index("id")["fold"]
    assert own.equals(_read(plain.work_dir / "folds.csv").set_index("id")["fold"])  # same split as without extra
    assert stats["sizes"] == [6, 6]


def test_training_sets_include_extra_rows_and_oof_files_exclude_them(comp: Path, extra: Path, tmp_path: Path,
                                                                     monkeypatch):
    ctx = _ctx(comp, tmp_path / "work", f"competition.extra=[{extra}]")
    clean.run(ctx)
    folds.run(ctx)
    seen = []
    real = fold_module.FoldData

    def recording(x_train, y_train, x_val, y_val, *args):
        seen.append((len(x_train), len(x_val), np.bincount(y_train, minlength=2).tolist()))
        return real(x_train, y_train, x_val, y_val, *args)

    monkeypatch.setattr(fold_module, "FoldData", recording)
    train_stage.run(ctx)
    table = _read(ctx.work_dir / "folds.csv")
    sizes = table["fold"].value_counts()
    # fold k trains on the other fold's 6 rows plus the 6 extra rows (3 cat, 3 dog besides the fold's own)
    assert [s[:2] for s in seen] == [(sizes[1] + 6, sizes[0]), (sizes[0] + 6, sizes[1])]
    for k, (_, _, counts) in enumerate(seen):
        own = table[(table["fold"] != k)]
        assert counts == [int((own["label"] == c).sum()) for c in ("cat", "dog")]
    predict.run(ctx)
    oof = pd.read_parquet(ctx.work_dir / "runs" / "d2l_lenet" / "oof.parquet")
    assert sorted(oof["id"]) == sorted(table.loc[table["fold"] >= 0, "id"]) and len(oof) == 12
    assert not oof["id"].str.startswith("more/").any() and set(oof["fold"]) == {0, 1}


def test_extra_image_equal_to_a_test_image_is_a_leak_dropped_unless_kept(comp: Path, tmp_path: Path):
    root = tmp_path / "extra1"
    (root / "more").mkdir(parents=True)
    shutil.copy(comp / "img/test_0.png", root / "more/leak.png")  # exact copy of a test image
    natural_image(3).save(comp / "img/test_2.png")  # a natural test image; the extra one is its JPEG re-encoding
    buf = io.BytesIO()
    natural_image(3).save(buf, "JPEG", quality=85)
    (root / "more/near.jpg").write_bytes(buf.getvalue())
    _extra(root, [("more/leak.png", "cat"), ("more/near.jpg", "dog"), ("more/x_0.png", "cat")])
    ctx = _ctx(comp, tmp_path / "work", f"competition.extra=[{root}]")
    summary = clean.run(ctx)
    assert (summary["extra_leaks"], summary["extra_leaks_dropped"], summary["extra_kept"]) == (2, 2, 1)
    dropped = _read(ctx.work_dir / "dropped.csv").set_index("id")
    leak = "extra image duplicates a test image (leak): test id img/test_0.png"
    assert dropped.loc["more/leak.png", "reason"] == leak
    assert dropped.loc["more/near.jpg", "reason"].endswith("(leak): test id img/test_2.png")
    assert set(dropped.loc[["more/leak.png", "more/near.jpg"], "source"]) == {str(root)}
    assert list(_read(ctx.work_dir / "clean.csv").query("source != ''")["id"]) == ["more/x_0.png"]
    page = (ctx.work_dir / "report" / "clean.html").read_text()
    assert "extra image duplicates a test image (leak)" in page and f"from {root}" in page
    kept = _ctx(comp, tmp_path / "work", f"competition.extra=[{root}]", "clean.keep_extra_leaks=true")
    summary = clean.run(kept)
    assert (summary["extra_leaks"], summary["extra_leaks_dropped"], summary["extra_kept"]) == (2, 0, 3)
    assert set(_read(kept.work_dir / "clean.csv").query("source != ''")["id"]) == {"more/leak.png", "more/near.jpg",
                                                                                   "more/x_0.png"}


def test_extra_copy_of_a_training_image_is_dropped_and_the_training_row_stays(comp: Path, tmp_path: Path):
    plain = _ctx(comp, tmp_path / "plain")
    clean.run(plain)
    root = tmp_path / "extra1"
    (root / "more").mkdir(parents=True)
    shutil.copy(comp / "img/cat_0.png", root / "more/same_label.png")
    shutil.copy(comp / "img/cat_1.png", root / "more/other_label.png")  # its label disagrees: still the extra goes
    _extra(root, [("more/same_label.png", "cat"), ("more/other_label.png", "dog"), ("more/a.png", "cat"),
                  ("more/b.png", "dog")])
    shutil.copy(root / "more/a.png", root / "more/a_as_dog.png")  # two extra copies that disagree: a conflict
    shutil.copy(root / "more/b.png", root / "more/b_again.png")  # two extra copies that agree: one is kept
    rows = pd.read_csv(root / "train.csv")
    more = pd.DataFrame({"image": ["more/a_as_dog.png", "more/b_again.png"], "label": ["dog", "dog"]})
    pd.concat([rows, more]).to_csv(root / "train.csv", index=False)
    ctx = _ctx(comp, tmp_path / "work", f"competition.extra=[{root}]")
    summary = clean.run(ctx)
    dropped = _read(ctx.work_dir / "dropped.csv").set_index("id")["reason"]
    assert dropped["more/same_label.png"] == "extra image duplicates a training image (kept): train id img/cat_0.png"
    assert dropped["more/other_label.png"] == "extra image duplicates a training image (kept): train id img/cat_1.png"
    assert dropped["more/a.png"] == dropped["more/a_as_dog.png"] == "label conflict in duplicate group"
    assert dropped["more/b_again.png"] == "exact duplicate of a kept image"
    table = _read(ctx.work_dir / "clean.csv")
    assert list(table.query("source != ''")["id"]) == ["more/b.png"] and summary["extra_duplicates_dropped"] == 2
    own = table.query("source == ''").drop(columns="source").reset_index(drop=True)
    assert own.equals(_read(plain.work_dir / "clean.csv").drop(columns="source"))  # the competition's rows: unchanged
    assert (summary["kept"], summary["conflicts_dropped"], summary["duplicates_dropped"]) == (12, 0, 0)


@pytest.mark.parametrize("case", ["missing folder", "missing csv", "unknown label", "empty label", "escape", "link out",
                                  "missing column", "same folder twice"])
def test_bad_extra_folders_are_one_line_errors(case: str, comp: Path, extra: Path, tmp_path: Path):
    folders = [str(extra)]
    expected = {"missing folder": rf"competition.extra: folder '{tmp_path}/nowhere' not found",
                "missing csv": rf"{extra}/train.csv: file not found",
                "unknown label": rf"{extra}/train.csv line 3: label 'fox' is not a class of {comp}/train.csv "
                                 r"\(cat, dog\)",
                "empty label": rf"{extra}/train.csv line 3: empty label in column 'label'",
                "escape": rf"{extra}/train.csv line 3: image path '../comp/img/cat_0.png' leads outside",
                "link out": rf"{extra}/train.csv line 3: image path 'more/link.png' leads outside",
                "missing column": rf"{extra}/train.csv: label column 'label' \(as in {comp}/train.csv\) missing",
                "same folder twice": rf"competition.extra: folder '{extra}/' is the same folder as '{extra}' "
                                     "again"}[case]
    rows = pd.read_csv(extra / "train.csv", dtype=str, keep_default_na=False)
    if case == "missing folder":
        folders = [str(tmp_path / "nowhere")]
    elif case == "missing csv":
        (extra / "train.csv").unlink()
    elif case == "same folder twice":
        folders.append(f"{extra}/")
    elif case == "missing column":
        rows.rename(columns={"label": "class"}).to_csv(extra / "train.csv", index=False)
    else:
        if case == "link out":
            os.symlink(comp / "img/cat_0.png", extra / "more/link.png")
        value = {"unknown label": ("more/x_1.png", "fox"), "empty label": ("more/x_1.png", ""),
                 "escape": ("../comp/img/cat_0.png", "cat"), "link out": ("more/link.png", "cat")}[case]
        rows.iloc[1] = value
        rows.to_csv(extra / "train.csv", index=False)
    before = _tree(extra)
    ctx = _ctx(comp, tmp_path / "work", f"competition.extra=[{','.join(folders)}]")
    with pytest.raises(PipelineError, match=expected) as info:
        clean.run(ctx)
    assert "\n" not in str(info.value)
    assert _tree(extra) == before and not (ctx.work_dir / "clean.csv").exists()


def test_extra_folders_stay_byte_identical_and_keys_cover_them(comp: Path, extra: Path, tmp_path: Path):
    second = _extra(tmp_path / "extra2", [("more/y_0.png", "cat"), ("more/y_1.png", "dog")], seed=2)
    before = _tree(extra), _tree(second), _tree(comp)
    args = (comp, tmp_path / "work", f"competition.extra=[{extra},{second}]", "clean.drop_flat=true")
    assert clean.run(_ctx(*args))["extra_kept"] == 8
    first = folds.run(_ctx(*args))
    assert clean.run(_ctx(*args)).get("skipped") and folds.run(_ctx(*args)).get("skipped")
    assert (_tree(extra), _tree(second), _tree(comp)) == before
    # an extra image's new bytes (now one flat colour, so dropped): clean, then folds rerun
    Image.fromarray(np.full((12, 10, 3), 7, dtype=np.uint8)).save(second / "more/y_0.png")  # now flat: dropped
    assert clean.run(_ctx(*args))["extra_kept"] == 7
    again = folds.run(_ctx(*args))
    assert not again.get("skipped") and again["folds_hash"] != first["folds_hash"] and again["extra_rows"] == 7
    # the extra CSV's bytes: a changed label reruns clean and folds
    rows = pd.read_csv(extra / "train.csv")
    rows.loc[0, "label"] = "cat" if rows.loc[0, "label"] == "dog" else "dog"
    rows.to_csv(extra / "train.csv", index=False)
    assert not clean.run(_ctx(*args)).get("skipped") and not folds.run(_ctx(*args)).get("skipped")
    # dropping a folder from the list reruns both too
    assert clean.run(_ctx(comp, tmp_path / "work", f"competition.extra=[{extra}]"))["extra_kept"] == 6


def test_a_changed_extra_folder_reruns_exactly_what_it_affects(tmp_path: Path, capsys):
    """Through the CLI chain: a kept extra image's new bytes retrain every fold (the split stays); a dropped one's
    rerun clean alone."""
    from pipeline.cli import main

    from .test_stage_contract import _classification, _ran, _replace_pixels, _state, _store_uncompressed

    data = _classification(tmp_path / "comp")
    root = tmp_path / "extra1"
    (root / "more").mkdir(parents=True)
    Image.new("RGB", (12, 10), "red").save(root / "more/flat.png")  # one flat colour: dropped (clean.drop_flat)
    _extra(root, [("more/flat.png", "cat"), ("more/a.png", "dog"), ("more/b.png", "fox")], seed=3)
    _store_uncompressed(root)
    work = tmp_path / "work"
    base = ["ensemble", "--data", str(data), "--work", str(work), "--submissions", str(tmp_path / "subs"),
            "--no-tuned", *FAST, "ensemble.caruana_rounds=5", f"competition.extra=[{root}]", "clean.drop_flat=true"]

    def run() -> set[str]:
        state, files = _state(work), (_tree(data), _tree(root))
        code = main(base)
        out = capsys.readouterr()
        assert code == 0, out.err
        assert (_tree(data), _tree(root)) == files, "an input folder changed"
        return _ran(state, _state(work))

    assert run() == {"clean", "folds", "train", "predict", "ensemble"}
    assert run() == set()
    _replace_pixels(root / "more/a.png")  # the same rows in clean.csv, so the same split: folds stays
    assert run() == {"clean", "train", "predict", "ensemble"}
    _replace_pixels(root / "more/flat.png")  # still one flat colour, still dropped: clean.csv is the same bytes
    assert run() == {"clean"}
    table = _read(work / "folds.csv")
    assert set(table.loc[table["fold"] == -1, "id"]) == {"more/a.png", "more/b.png"}


def test_autogluon_oof_rows_take_their_truth_from_validation_rows_not_extra_rows(comp: Path, tmp_path: Path):
    """An extra row may share an id with a competition row (another folder); AutoGluon's OOF rows are competition
    rows, so their labels come from the fold >= 0 rows (AutoGluon itself trains on `fold != k`: extra rows too)."""
    from pipeline.stages.autogluon import to_pipeline_files

    ctx = _ctx(comp, tmp_path / "work")
    out = tmp_path / "work" / "autogluon"
    out.mkdir(parents=True)
    pd.DataFrame({"id": ["a", "b", "a"], "label": ["cat", "dog", "dog"], "y": [0, 1, 1], "fold": [0, 1, -1],
                  "source": ["", "", "extra1"]}).to_csv(tmp_path / "work" / "folds.csv", index=False)
    pd.DataFrame({"cat": [0.6, 0.3], "dog": [0.4, 0.7], "id": ["a", "b"], "fold": [0, 1]}).to_csv(out / "oof_raw.csv",
                                                                                                  index=False)
    pd.DataFrame({"cat": [0.5], "dog": [0.5], "id": ["t"]}).to_csv(out / "test_raw.csv", index=False)
    assert to_pipeline_files(ctx, out, ["cat", "dog"], "hash") == 1.0
    oof = pd.read_parquet(out / "oof.parquet")
    assert oof[["id", "fold", "label", "y"]].values.tolist() == [["a", 0, "cat", 0], ["b", 1, "dog", 1]]
