"""The stage contract, stage by stage: each stage's key covers exactly what it reads.

For every stage, on a tiny competition: the first run runs the chain (once per chain: each case starts from a copy
of that cold run); a rerun skips every stage
(stamps untouched, "up to date" printed); changing one key of the stage reruns that stage and the
stages that read its output, while the ones before it are skipped. Replacing a training image's
bytes (same size, old mtime put back) reruns what learns from it; replacing a test image reruns
only what predicts (and clean, which checks test images), never training. The competition folder
stays byte-identical through every run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.detection.bananas import build_bananas

from .conftest import REPO, tiny

CLASSIFY = tiny("ensemble.caruana_rounds=5", "tune.n_trials=1", "tune.epochs=1", "tune.pruner=none",
            "autogluon.folds=[0]", "autogluon.epochs=1", "autogluon.image_size=16", "autogluon.batch_size=8",
            "autogluon.backbone=resnet10t", f"autogluon.python={REPO / '.venv-autogluon' / 'bin' / 'python'}")
DETECT = ["detect.train.image_size=64", "detect.train.epochs=1", "detect.train.batch_size=4",
          "detect.predict.gallery_images=2", "detect.folds.n_splits=1", "detect.evaluate.tta=none",
          "runtime.device=cpu", "runtime.threads=1"]
STAMPS = {"clean": ["clean.json"], "folds": ["folds.json"],
          "train": ["runs/d2l_lenet/fold0/best.json", "runs/d2l_lenet/fold1/best.json"],
          "predict": ["runs/d2l_lenet/predict.json"], "ensemble": ["ensemble/weights.json"],
          "autogluon": ["autogluon/autogluon.json"], "detect:train": ["detect/model.json"],
          "detect:evaluate": ["detect/metrics.json"], "detect:predict": ["detect/predict.json"]}
CHAINS = {"ensemble": {"clean", "folds", "train", "predict", "ensemble"}, "tune": {"clean", "folds", "tune"},
          "autogluon": {"clean", "folds", "autogluon"}, "detect": {"detect:train", "detect:evaluate", "detect:predict"}}
UP_TO_DATE = {"ensemble": 6, "tune": 2, "autogluon": 3, "detect": 3}  # lines printed by a rerun (train: one per fold)
TRAIN_IMAGE = {"classify": "img/dog_2.png", "detect": "images/train_0003.png"}
TEST_IMAGE = {"classify": "img/test_1.png", "detect": "images/test_0002.png"}


@dataclass
class Case:
    stage: str
    target: str  # the make target run: the last stage of the chain the changed stage belongs to
    change: str  # one key of `stage`
    reruns: set[str]
    train_image: set[str] = field(default_factory=set)  # empty: not checked in this case
    test_image: set[str] = field(default_factory=set)


CASES = [
    Case("clean", "ensemble", "clean.drop_exact_duplicates=false", {"clean", "folds", "train", "predict", "ensemble"}),
    Case("clean", "ensemble", "clean.report_groups=1", {"clean"}),  # clean.csv unchanged: nothing after it reruns
    Case("folds", "ensemble", "folds.seed=7", {"folds", "train", "predict", "ensemble"}),
    Case("train", "ensemble", "train.lr=0.01", {"train", "predict", "ensemble"}),
    Case("predict", "ensemble", "predict.tta=[identity,hflip]", {"predict", "ensemble"}),
    Case("ensemble", "ensemble", "ensemble.caruana_rounds=3", {"ensemble"},
         train_image={"clean", "train", "predict", "ensemble"}, test_image={"clean", "predict", "ensemble"}),
    Case("tune", "tune", "tune.epochs=2", {"tune"}, train_image={"clean", "tune"}, test_image={"clean"}),
    Case("autogluon", "autogluon", "autogluon.epochs=2", {"autogluon"},
         train_image={"clean", "autogluon"}, test_image={"clean", "autogluon"}),
    Case("detect:train", "detect", "detect.train.epochs=2", CHAINS["detect"],
         train_image=CHAINS["detect"], test_image={"detect:predict"}),
    Case("detect:evaluate", "detect", "detect.evaluate.map_score_threshold=0.02", {"detect:evaluate"}),
    Case("detect:predict", "detect", "detect.predict.score_threshold=0.3", {"detect:predict"}),
]


def _store_uncompressed(root: Path) -> None:
    """PNGs without compression: new pixels then give a file of the very same size."""
    for path in root.rglob("*.png"):
        with Image.open(path) as im:
            im.load()
            im.save(path, compress_level=0)


def _classification(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = [(f"img/{c}_{i}.png", c) for c in ("cat", "dog", "fox") for i in range(6)]  # AutoGluon needs 3 classes
    for name, _ in rows:
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / name)
    (root / "img" / "cat_5.png").write_bytes((root / "img" / "cat_4.png").read_bytes())  # one exact duplicate pair
    test = [f"img/test_{i}.png" for i in range(3)]
    for name in test:
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / name)
    pd.DataFrame(rows, columns=["image", "label"]).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"image": test}).to_csv(root / "test.csv", index=False)
    pd.DataFrame({"image": test, "label": "cat"}).to_csv(root / "sample_submission.csv", index=False)
    return root


def _replace_pixels(path: Path) -> None:
    """Inverted pixels, same file size, the old mtime put back: only the bytes tell."""
    st = path.stat()
    with Image.open(path) as im:
        inverted = Image.fromarray(255 - np.asarray(im))
    inverted.save(path, compress_level=0)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def _tree(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _state(work: Path) -> dict[str, object]:
    """Per stage, what changes when it runs: its stamps' inode and mtime (atomic writes make a new inode each time);
    for tune, which writes no stamp, the number of trials in its storage."""
    state: dict[str, object] = {}
    for stage, files in STAMPS.items():
        stats = [(work / f).stat() if (work / f).exists() else None for f in files]
        state[stage] = [(s.st_ino, s.st_mtime_ns) if s else None for s in stats]
    storage = f"sqlite:///{work / 'optuna.db'}"
    names = optuna.get_all_study_names(storage) if (work / "optuna.db").exists() else []
    state["tune"] = sum(len(optuna.load_study(study_name=n, storage=storage).trials) for n in names) or None
    return state


def _ran(before: dict, after: dict) -> set[str]:
    return {stage for stage in after if after[stage] != before[stage]}


def _data(target: str, root: Path) -> Path:
    return root / ("bananas" if target == "detect" else "comp")


def _base(target: str, root: Path) -> list[str]:
    """The command line of `target`'s chain on the competition and work folder under `root`."""
    base = [target, "--data", str(_data(target, root)), "--work", str(root / "work"), "--submissions",
            str(root / "subs"), "--no-tuned", *(DETECT if target == "detect" else CLASSIFY)]
    return base + [f"tune.space={root / 'space.yaml'}"] if target == "tune" else base


@pytest.fixture(scope="module")
def cold_chain(tmp_path_factory):
    """cold_chain(target): a folder (competition, work, submissions) where `target`'s chain ran once from nothing.
    The chain runs once per module, then its folder is kept as a template; each call puts a fresh copy of it back
    at the very path it ran in (stamps hold absolute paths), so cases stay independent."""
    templates: dict[str, Path] = {}

    def get(target: str) -> Path:
        root = tmp_path_factory.getbasetemp() / f"cold-{target}"
        if target not in templates:
            shutil.rmtree(root, ignore_errors=True)  # a build that failed before
            root.mkdir()
            if target == "detect":
                data = build_bananas(_data(target, root), n_train=8, n_val=4, n_test=4, seed=1)
            else:
                data = _classification(_data(target, root))
            _store_uncompressed(data)
            (root / "space.yaml").write_text("train.lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}\n")
            before, files = _state(root / "work"), _tree(data)
            assert main(_base(target, root)) == 0
            assert _tree(data) == files, "the competition folder changed"
            assert _ran(before, _state(root / "work")) == CHAINS[target]  # the cold run runs the whole chain
            templates[target] = tmp_path_factory.mktemp(f"template-{target}") / "copy"
            shutil.copytree(root, templates[target])  # copy2: mtimes kept
        shutil.rmtree(root)
        shutil.copytree(templates[target], root)
        return root

    return get


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[f"{c.stage}:{c.change}" for c in CASES])
def test_each_stage_reruns_exactly_when_what_it_reads_changes(case: Case, capsys, cold_chain):
    kind = "detect" if case.target == "detect" else "classify"
    root = cold_chain(case.target)
    capsys.readouterr()
    data, work, base = _data(case.target, root), root / "work", _base(case.target, root)

    def run(*extra: str) -> tuple[set[str], str]:
        before, files = _state(work), _tree(data)
        code = main([*base, *extra])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert _tree(data) == files, "the competition folder changed"
        return _ran(before, _state(work)), out.out

    ran, out = run()
    assert ran == set() and out.count("up to date") == UP_TO_DATE[case.target], out
    assert not re.search(r"tune: trial \d", out), out
    assert run(case.change)[0] == case.reruns
    if case.train_image:
        _replace_pixels(data / TRAIN_IMAGE[kind])
        assert run(case.change)[0] == case.train_image
    if case.test_image:
        predictions = _tree(work / "runs" / "d2l_lenet") if case.target == "ensemble" else {}
        _replace_pixels(data / TEST_IMAGE[kind])
        assert run(case.change)[0] == case.test_image
        if predictions:  # the OOF file is the same bytes: ensemble reran for the changed test.parquet alone
            now = _tree(work / "runs" / "d2l_lenet")
            assert (now["oof.parquet"] == predictions["oof.parquet"]
                    and now["test.parquet"] != predictions["test.parquet"])
