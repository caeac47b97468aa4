from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import CompetitionConfig
from pipeline.core.errors import PipelineError
from pipeline.data.competition import read_competition
from pipeline.scoring import submission


@pytest.fixture
def comp(comp_dir: Path):
    return read_competition(comp_dir, CompetitionConfig())


def _proba(comp, seed=0):
    p = np.random.default_rng(seed).random((len(comp.test), len(comp.classes)))
    return p / p.sum(1, keepdims=True)


def test_labels_follow_sample_submission_order(comp):
    ids = comp.test["id"].to_numpy()[::-1]  # predictions arrive in another order
    proba = _proba(comp)
    frame = submission.build(comp, ids, proba, "labels")
    assert list(frame.columns) == ["image", "label"]
    assert list(frame["image"]) == list(comp.sample_submission["image"])
    expected = dict(zip(ids, np.asarray(comp.classes)[proba.argmax(1)], strict=True))
    assert list(frame["label"]) == [expected[i] for i in frame["image"]]
    submission.validate(frame, comp)


def test_probability_submissions_are_detected_and_checked(comp_dir: Path):
    sample = pd.read_csv(comp_dir / "sample_submission.csv")
    sample[["image"]].assign(cat=0.5, dog=0.5).to_csv(comp_dir / "sample_submission.csv", index=False)
    comp = read_competition(comp_dir, CompetitionConfig())
    assert submission.output_kind(comp, "auto") == "probabilities"
    frame = submission.build(comp, comp.test["id"].to_numpy(), _proba(comp), "probabilities")
    submission.validate(frame, comp)
    bad = frame.assign(cat=frame["cat"] + 0.3)
    with pytest.raises(PipelineError, match="must sum to 1"):
        submission.validate(bad, comp)
    with pytest.raises(PipelineError, match="finite"):
        submission.validate(frame.assign(cat=np.nan), comp)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda f: f.iloc[1:], "ids differ"),
        (lambda f: pd.concat([f, f.iloc[:1]]), "duplicate id"),
        (lambda f: f.iloc[::-1], "order"),
        (lambda f: f.assign(label="bird"), "label 'bird'"),
        (lambda f: f.rename(columns={"label": "target"}), "columns"),
    ],
    ids=["missing", "duplicate", "order", "unknown-label", "columns"],
)
def test_validation_catches(comp, mutate, pattern):
    good = submission.build(comp, comp.test["id"].to_numpy(), _proba(comp), "labels")
    with pytest.raises(PipelineError, match=pattern):
        submission.validate(mutate(good), comp)


def test_write_keeps_earlier_submissions(comp, tmp_path: Path):
    frame = submission.build(comp, comp.test["id"].to_numpy(), _proba(comp), "labels")
    submission.write(frame, comp, tmp_path, {"models": ["m"]})
    submission.write(frame, comp, tmp_path, {"models": ["m"]})
    assert (tmp_path / "comp.csv").exists() and (tmp_path / "comp.manifest.json").exists()
    assert len(list((tmp_path / "history").glob("comp-*.csv"))) == 2


def test_score_file(tmp_path: Path):
    sol = pd.DataFrame({"image": ["a", "b", "c", "d"], "label": ["1", "2", "1", "3"]})
    sub = pd.DataFrame({"image": ["d", "c", "b", "a"], "label": ["3", "1", "1", "1"]})
    sol.to_csv(tmp_path / "sol.csv", index=False)
    sub.to_csv(tmp_path / "sub.csv", index=False)
    assert submission.score_file(tmp_path / "sub.csv", tmp_path / "sol.csv") == 0.75
    sub.iloc[:3].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(PipelineError, match="ids do not match"):
        submission.score_file(tmp_path / "short.csv", tmp_path / "sol.csv")


def test_artifacts_get_ordinary_permissions(tmp_path: Path):
    import os
    import stat

    from pipeline.core.artifacts import write_text

    path = write_text(tmp_path / "x.txt", "hi")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask and path.read_text() == "hi"
    assert not list(tmp_path.glob(".x.txt.*"))  # no temporary file left behind
