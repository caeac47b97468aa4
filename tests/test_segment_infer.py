"""Prediction with flip views: each view's map is flipped back onto the image, so a mirrored input gives the
mirrored masks back exactly, and views combine the same way stored apart (OOF) or together (test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.segmentation.infer import combine, predict_views, view_sets
from pipeline.segmentation.models import create
from pipeline.training.runtime import Runtime

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return create("unet", "resnet18", 2).eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


def test_view_sets_start_plain_and_add_the_enabled_flips():
    assert view_sets(False, False) == [("identity",)]
    assert view_sets(True, True) == [("identity",), ("identity", "hflip"), ("identity", "vflip"),
                                     ("identity", "hflip", "vflip")]


def test_a_flipped_view_is_undone_on_the_mask(net, images):
    rt = Runtime()
    plain = predict_views(net, images, ("identity",), 4, rt, combined=True)
    assert plain.shape == (3, 2, 32, 32) and plain.dtype == np.uint8
    mirrored = images[:, :, ::-1]
    # the mirror view of the mirrored image is the plain image's map
    np.testing.assert_array_equal(predict_views(net, mirrored, ("hflip",), 4, rt, combined=True), plain[..., ::-1])
    upside_down = images[:, ::-1]
    np.testing.assert_array_equal(predict_views(net, upside_down, ("vflip",), 4, rt, combined=True),
                                  plain[..., ::-1, :])
    # an untrained net is not symmetric, so the check above could fail
    assert not np.array_equal(predict_views(net, mirrored, ("identity",), 4, rt, combined=True), plain[..., ::-1])


def test_flip_tta_of_a_mirrored_input_is_the_mirrored_tta_exactly(net, images):
    rt = Runtime()
    views = ("identity", "hflip")
    tta = predict_views(net, images, views, 2, rt, combined=True)
    np.testing.assert_array_equal(predict_views(net, images[:, :, ::-1], views, 2, rt, combined=True),
                                  tta[..., ::-1])
    apart = predict_views(net, images, views, 2, rt)  # (N, V, C, S, S), as OOF stores them
    assert apart.shape == (3, 2, 2, 32, 32)
    np.testing.assert_array_equal(combine(apart), tta)


def test_predictions_are_written_into_the_given_array(net, images, tmp_path):
    out = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.uint8, shape=(3, 2, 32, 32))
    predict_views(net, images, ("identity",), 1, Runtime(), out=out, combined=True)
    out.flush()
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"),
                                  predict_views(net, images, ("identity",), 4, Runtime(), combined=True))


def test_combine_is_the_rounded_mean_of_uint8_maps():
    maps = np.array([[[0, 100, 255]], [[1, 103, 255]]], np.uint8).transpose(1, 0, 2)  # (1, V=2, 3)
    np.testing.assert_array_equal(combine(maps), [[0, 102, 255]])
