"""The labels stage (cleanlab on the chosen blend's OOF) and the clean.label_issues policies."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.context import Context
from pipeline.core.config import load_config
from pipeline.scoring import label_issues
from pipeline.scoring.predictions import prob_columns, write_parquet
from pipeline.stages import clean, folds
from pipeline.stages import label_issues as labels

from .conftest import write_competition

CLASSES = ["a", "b", "c"]


def _ctx(data: Path, work: Path, *overrides: str) -> Context:
    return Context(load_config(None, ["clean.workers=1", *overrides]), data, work)


def _tree_digest(root: Path) -> dict[str, str]:
    files = (p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def planted_oof(n: int = 200, n_flip: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(given labels, OOF probabilities, positions flipped): predictions mostly confident in the true class,
    20 honest rows hard (true class barely first), and `n_flip` given labels moved to another class."""
    rng = np.random.default_rng(seed)
    true = np.arange(n) % 3
    alpha = np.ones((n, 3))
    alpha[np.arange(n), true] = 12.0
    hard = rng.choice(n, 20, replace=False)
    alpha[hard, true[hard]] = 2.5
    proba = np.stack([rng.dirichlet(a) for a in alpha])
    flipped = rng.choice(np.setdiff1d(np.arange(n), hard), n_flip, replace=False)
    given = true.copy()
    given[flipped] = (true[flipped] + rng.integers(1, 3, n_flip)) % 3
    return given, proba, flipped


def test_planted_flips_are_found_with_precision():
    given, proba, flipped = planted_oof()
    found, confidence = label_issues.find_issues(given, proba)
    hits = len(set(found) & set(flipped))
    assert hits >= 9, f"recall {hits}/10"
    assert hits / len(found) >= 0.8, f"precision {hits}/{len(found)}"
    assert np.all(np.diff(confidence[found]) >= 0)  # ranked least self-confident first


def _work_with_oof(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """WORK with ensemble/oof.parquet and folds.csv (real PNG paths), as the ensemble and folds stages write them."""
    given, proba, flipped = planted_oof()
    work, img = tmp_path / "work", tmp_path / "img"
    img.mkdir(parents=True)
    rng = np.random.default_rng(1)
    ids = [f"r{i:03d}" for i in range(len(given))]
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(img / f"{i}.png")
    label = np.asarray(CLASSES)[given]
    fold = np.arange(len(ids)) % 5
    pd.DataFrame({"id": ids, "label": label, "y": given, "group": range(len(ids)), "path": [str(img / f"{i}.png")
                  for i in ids], "source": "", "split_group": np.arange(len(ids)) // 2, "fold": fold}
                 ).to_csv(work.mkdir() or work / "folds.csv", index=False)
    oof = pd.concat([pd.DataFrame({"id": ids, "fold": fold, "label": label, "y": given}),
                     pd.DataFrame(proba, columns=prob_columns(CLASSES))], axis=1)
    write_parquet(work / "ensemble" / "oof.parquet", oof, {"model": "mean", "classes": CLASSES, "folds_hash": "x"})
    return work, img, np.asarray(ids)[flipped]


def test_labels_stage_writes_the_list_and_report_and_is_stamped(tmp_path: Path, capsys):
    work, img, flipped_ids = _work_with_oof(tmp_path)
    data = write_competition(tmp_path / "comp")
    before = _tree_digest(data), _tree_digest(img)
    meta = labels.run(_ctx(data, work))
    table = pd.read_csv(work / "label_issues.csv", dtype={"id": str})
    assert list(table.columns) == label_issues.COLUMNS + ["group"]
    assert meta["flagged"] == len(table) and len(set(table["id"]) & set(flipped_ids)) >= 9
    assert list(table["rank"]) == list(range(1, len(table) + 1))
    assert table["self_confidence"].is_monotonic_increasing
    assert (table["given_label"] != table["suggested_label"]).all()
    assert meta["cv_given_except_flagged"] > meta["cv_given"] + 0.03  # the flagged rows were the wrong ones
    page = (work / "report" / "labels.html").read_text()
    assert page.count("data:image/png;base64,") == len(table) and "suggested" in page
    out = capsys.readouterr().out
    assert f"labels: {len(table)} of 200 rows flagged" in out and str(work / "report" / "labels.html") in out
    stamp = (work / "labels.json").read_bytes()
    labels.run(_ctx(data, work))
    assert "labels: up to date" in capsys.readouterr().out and (work / "labels.json").read_bytes() == stamp
    labels.run(_ctx(data, work, "clean.report_groups=3"))  # a key of the stage: reruns
    assert (work / "report" / "labels.html").read_text().count("data:image/png;base64,") == 3
    assert before == (_tree_digest(data), _tree_digest(img))


def _clean(data: Path, work: Path, policy: str, capsys) -> tuple[pd.DataFrame, str]:
    clean.run(_ctx(data, work, f"clean.label_issues={policy}"))
    return pd.read_csv(work / "clean.csv", dtype=str), capsys.readouterr().out


def test_drop_and_relabel_policies_change_clean_and_rerun_only_then(tmp_path: Path, capsys):
    data, work = write_competition(tmp_path / "comp", n_per_class=6), tmp_path / "work"
    before = _tree_digest(data)
    given, _ = _clean(data, work, "report", capsys)
    pd.DataFrame({"id": ["img/cat_0.png", "img/dog_1.png"], "path": "", "given_label": ["cat", "dog"],
                  "suggested_label": ["dog", "cat"], "self_confidence": [0.01, 0.02], "rank": [1, 2]}
                 ).to_csv(work / "label_issues.csv", index=False)
    kept, out = _clean(data, work, "report", capsys)
    assert "clean: up to date" in out and kept.equals(given)  # report: the list changes nothing

    kept, out = _clean(data, work, "drop", capsys)
    assert "label_issues_dropped=2" in out and len(kept) == 10
    assert not kept["id"].isin(["img/cat_0.png", "img/dog_1.png"]).any()
    dropped = pd.read_csv(work / "dropped.csv", dtype=str).set_index("id")
    assert dropped.loc["img/cat_0.png", "reason"] == "label issue (cleanlab)"
    assert not (work / "relabelled.csv").exists()

    kept, out = _clean(data, work, "relabel", capsys)
    assert "relabelled=2" in out and len(kept) == 12
    by_id = kept.set_index("id")
    assert by_id.loc["img/cat_0.png", "label"] == "dog" and by_id.loc["img/cat_0.png", "y"] == "1"
    assert by_id.loc["img/dog_1.png", "label"] == "cat" and by_id.loc["img/dog_1.png", "y"] == "0"
    assert (kept.drop(columns=["label", "y"]).equals(given.drop(columns=["label", "y"])))
    assert (by_id["label"] != given.set_index("id")["label"]).sum() == 2
    rel = pd.read_csv(work / "relabelled.csv", dtype=str)
    assert rel.values.tolist() == [["img/cat_0.png", "cat", "dog", "0.01"], ["img/dog_1.png", "dog", "cat", "0.02"]]
    folds.run(_ctx(data, work, "clean.label_issues=relabel", "folds.n_splits=2"))  # the folds see the new labels
    assert pd.read_csv(work / "folds.csv", dtype=str).set_index("id").loc["img/cat_0.png", "label"] == "dog"

    _, out = _clean(data, work, "relabel", capsys)
    assert "clean: up to date" in out
    pd.read_csv(work / "label_issues.csv").head(1).to_csv(work / "label_issues.csv", index=False)
    kept, out = _clean(data, work, "relabel", capsys)  # the list changed: clean reruns
    assert "relabelled=1" in out and kept.set_index("id").loc["img/dog_1.png", "label"] == "dog"
    kept, _ = _clean(data, work, "report", capsys)
    assert kept.equals(given) and not (work / "relabelled.csv").exists()
    assert before == _tree_digest(data)


def test_labels_keeps_the_list_the_models_were_trained_with(tmp_path: Path, capsys):
    """After relabel the OOF is against cleaned labels: the stage prints both CVs and does not replace the list."""
    data, work = write_competition(tmp_path / "comp", n_per_class=6), tmp_path / "work"
    clean.run(_ctx(data, work))
    pd.DataFrame({"id": ["img/cat_0.png"], "path": "", "given_label": ["cat"], "suggested_label": ["dog"],
                  "self_confidence": [0.01], "rank": [1]}).to_csv(work / "label_issues.csv", index=False)
    listed = (work / "label_issues.csv").read_bytes()
    kept = pd.read_csv(work / "clean.csv", dtype=str)
    clean.run(_ctx(data, work, "clean.label_issues=relabel"))
    kept = pd.read_csv(work / "clean.csv", dtype=str)
    proba = np.where(kept["label"].to_numpy()[:, None] == np.array(["cat", "dog"]), 0.9, 0.1)
    oof = pd.concat([kept[["id", "label"]].assign(fold=0, y=(kept["label"] == "dog").astype(int)),
                     pd.DataFrame(proba, columns=prob_columns(["cat", "dog"]))], axis=1)
    write_parquet(work / "ensemble" / "oof.parquet", oof, {"classes": ["cat", "dog"]})
    meta = labels.run(_ctx(data, work, "clean.label_issues=relabel"))
    assert meta["cv_cleaned"] == 1.0 and meta["cv_given"] == 11 / 12
    assert "against the cleaned labels" in capsys.readouterr().out
    assert (work / "label_issues.csv").read_bytes() == listed
