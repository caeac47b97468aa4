import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.context import Context
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.stages import clean
from pipeline.training.fold import folds_to_train
from pipeline.training.models import build_model, dataset_norm

from .conftest import REPO


def test_dataset_norm_in_chunks_matches_numpy():
    images = np.random.default_rng(0).integers(0, 255, (50, 5, 5, 3), dtype=np.uint8)
    norm = dataset_norm(images, chunk=7)
    flat = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(norm["mean"], flat.mean(0), atol=1e-6)
    np.testing.assert_allclose(norm["std"], flat.std(0), atol=1e-6)


def test_cache_decodes_once_and_matches_channels(comp_dir: Path, tmp_path: Path):
    ctx = Context(load_config(), comp_dir, tmp_path / "work")
    clean.run(ctx)
    assert ctx.input_channels() == 3
    paths = list(ctx.competition.train["path"])
    first = ctx.decoded_images(paths, 8, 3, "train")
    assert first.shape == (8, 8, 8, 3) and first.dtype == np.uint8
    files = list((ctx.work_dir / "cache").glob("*.npy"))
    mtime = files[0].stat().st_mtime_ns
    again = ctx.decoded_images(paths, 8, 3, "train")
    assert np.array_equal(first, again) and files[0].stat().st_mtime_ns == mtime
    assert ctx.decoded_images(paths, 8, 1, "train").shape == (8, 8, 8, 1)


def test_digits_are_fed_as_one_channel(small_digits: Path, tmp_path: Path):
    ctx = Context(load_config(), small_digits, tmp_path / "work")
    clean.run(ctx)
    assert ctx.input_channels() == 1
    assert Context(load_config(None, ["competition.channels=rgb"]), small_digits,
                   tmp_path / "work").input_channels() == 3


def test_unknown_backbone_suggests_a_name():
    with pytest.raises(PipelineError, match="did you mean 'resnet18'"):
        build_model("resnet81", 3, 3)


def test_model_follows_classes_and_channels():
    import torch

    model = build_model("resnet10t", num_classes=7, in_chans=1)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 7)


def test_pretrained_offline_is_a_one_line_error_naming_the_key():
    code = "from pipeline.training.models import build_model; build_model('resnet18', 10, 3, pretrained=True)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", "import sys; from pipeline.cli import main\n"
                          "from pipeline.core.errors import PipelineError\n"
                          f"try:\n    exec({code!r})\nexcept PipelineError as e:\n    print(e); sys.exit(2)"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "model.pretrained" in res.stdout and "model.pretrained_path" in res.stdout


def test_folds_to_train_checks_range():
    assert folds_to_train(None, 3) == [0, 1, 2] and folds_to_train([2], 3) == [2]
    with pytest.raises(PipelineError, match=r"train.folds: folds \[5\] do not exist"):
        folds_to_train([5], 3)


def test_cache_equals_direct_decoding_and_batched_reads_equal_single_reads(comp_dir: Path, tmp_path: Path):
    import torch

    from pipeline.data.images import load_image, resize, to_channels
    from pipeline.training.feeding import ArrayDataset

    ctx = Context(load_config(), comp_dir, tmp_path / "work")
    clean.run(ctx)
    paths = list(ctx.competition.train["path"])
    cache = ctx.decoded_images(paths, 12, 3, "train")
    for i, path in enumerate(paths):
        assert np.array_equal(cache[i], resize(to_channels(load_image(path), 3), 12))
    data = ArrayDataset(cache, np.arange(len(paths)))
    x, y = data.__getitems__([5, 1, 3])
    assert torch.equal(x, torch.stack([data[i][0] for i in (5, 1, 3)])) and y.tolist() == [5, 1, 3]
