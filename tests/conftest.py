"""Shared fixtures: tiny competitions made on the fly (generated images or scikit-learn's digits)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.data.digits import build_digits

REPO = Path(__file__).resolve().parents[1]

# The one tiny classification config of the suite: 2 folds, 1 epoch of LeNet on 16 px images, on one CPU thread, no
# TTA. Tests pass their own differences after it (a key given again replaces the earlier value).
TINY = ("folds.n_splits=2", "train.epochs=1", "train.image_size=16", "train.batch_size=8", "train.warmup_epochs=0",
        "model.backbones=[d2l_lenet]", "runtime.device=cpu", "runtime.threads=1", "clean.workers=1",
        "predict.tta=[identity]")


def tiny(*extra: str) -> list[str]:
    """The tiny config's overrides followed by `extra` (which win)."""
    return [*TINY, *extra]


def write_competition(root: Path, n_per_class: int = 4, classes=("cat", "dog"), n_test: int = 3, seed: int = 0) -> Path:
    """A valid competition of random RGB PNGs: train.csv, test.csv, sample_submission.csv."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for c in classes:
        for i in range(n_per_class):
            name = f"img/{c}_{i}.png"
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / name)
            rows.append((name, c))
    pd.DataFrame(rows, columns=["image", "label"]).to_csv(root / "train.csv", index=False)
    test = []
    for i in range(n_test):
        name = f"img/test_{i}.png"
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / name)
        test.append(name)
    pd.DataFrame({"image": test}).to_csv(root / "test.csv", index=False)
    pd.DataFrame({"image": test, "label": classes[0]}).to_csv(root / "sample_submission.csv", index=False)
    return root


def natural_image(seed: int, size: int = 128) -> Image.Image:
    """A natural-looking RGB picture: smooth colour background, 4-8 random shapes, mild noise."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (3, 3, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(4, 9))):
        x0, y0 = (int(v) for v in rng.integers(-size // 6, size, 2))
        w, h = (int(v) for v in rng.integers(size // 12, size // 2, 2))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif shape == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            draw.line([x0, y0, x0 + w, y0 + h], fill=colour, width=int(rng.integers(2, 8)))
    noisy = np.asarray(im, dtype=np.float64) + rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session", autouse=True)
def one_mlflow_store(tmp_path_factory):
    """Every training in the suite (subprocesses too) logs to one MLflow store: a new SQLite store takes seconds to
    create its tables, a run milliseconds. Tests of the default store unset MLFLOW_TRACKING_URI."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def interrupt_in_epoch(monkeypatch, trainer_cls, epoch: int, run) -> None:
    """Call run() (a fit) with trainer_cls.train_epoch raising KeyboardInterrupt when it reaches `epoch` (a
    Ctrl-C in the middle of that epoch's training), then restore the real train_epoch for the resumed run."""
    import pytest

    original = trainer_cls.train_epoch

    def die(self, current: int):
        if current == epoch:
            raise KeyboardInterrupt
        return original(self, current)

    monkeypatch.setattr(trainer_cls, "train_epoch", die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(trainer_cls, "train_epoch", original)


def kill_after_epoch(cmd: list[str], last_pt: Path, epoch: int = 2) -> None:
    """Start `cmd` and SIGKILL it once its `last.pt` records `epoch` (a kill mid-run, as the OOM killer's);
    fails when the run ends before that."""
    import signal
    import subprocess
    import time

    import torch

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        try:
            if torch.load(last_pt, weights_only=True)["epoch"] >= epoch:
                proc.send_signal(signal.SIGKILL)
                break
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed; make it longer"


@pytest.fixture
def comp_dir(tmp_path: Path) -> Path:
    return write_competition(tmp_path / "comp")


@pytest.fixture(scope="session")
def small_digits(tmp_path_factory) -> Path:
    """400 real digits images as a competition folder (hidden solution beside it)."""
    return build_digits(tmp_path_factory.mktemp("digits") / "digits", limit=400)


@pytest.fixture
def one_thread():
    """Torch in one thread for the test: convolutions this small run fastest so, and on a busy machine two threads
    made a detection training test 50x slower (32 s instead of 0.4 s per run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
