"""`make auto` on a segmentation folder: the planner as a pure function of a profile, made-up speeds and a budget, the
timed steps on real arrays, and the whole run on a tiny generated folder (within its budget, a valid submission, a
rerun that measures and trains nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from pipeline import auto
from pipeline.core.config import RuntimeConfig, load_config
from pipeline.scoring.submission import read_submission
from pipeline.segmentation import models, planning, speed
from pipeline.segmentation.data import read_segmentation
from pipeline.segmentation.generate import build_masks
from pipeline.segmentation.planning import SegmentationProfile
from pipeline.segmentation.submit import validate_segmentation
from pipeline.training import runtime

from .conftest import REPO

# made-up seconds per image (training, validation) of the default U-Net at each candidate size: about quadratic in the
# side, as a CPU's are
SPEEDS = {256: (0.2, 0.06), 192: (0.11, 0.035), 128: (0.05, 0.015)}


def profile(images=1000, test_images=300, side=256) -> SegmentationProfile:
    return SegmentationProfile(images=images, test_images=test_images, classes=4, image_side=side, empty_share=0.4,
                               device="cpu")


def test_candidate_sizes_start_at_the_images_own_side_capped_and_never_go_below_64():
    assert planning.candidate_sizes(101) == [128, 96, 64]  # rounded up to a multiple of 32, then 3/4 and 1/2
    assert planning.candidate_sizes(1600) == [256, 192, 128]  # capped at 256
    assert planning.candidate_sizes(40) == [64] and planning.candidate_sizes(64) == [64]


def test_a_loose_budget_trains_at_the_images_own_size_on_five_folds_a_tight_one_smaller_and_fewer():
    loose = planning.plan(profile(), SPEEDS, 8 * 3600)
    assert (loose.image_size, loose.n_splits, loose.epochs) == (256, 5, 22)
    assert loose.patience == planning.PATIENCE == 5
    middle = planning.plan(profile(), SPEEDS, 4 * 3600)  # own size, but 5 folds would cost it its 20 epochs
    assert (middle.image_size, middle.n_splits, middle.epochs) == (256, 3, 20)
    tight = planning.plan(profile(), SPEEDS, 3600)
    assert (tight.image_size, tight.n_splits, tight.epochs) == (128, 3, 20)
    tighter = planning.plan(profile(), SPEEDS, 30 * 60)  # the smallest size, and fewer epochs than wanted
    assert (tighter.image_size, tighter.n_splits, tighter.epochs) == (128, 3, 9)
    assert any("image size 128 px" in n for n in tight.notes) and not any("image size" in n for n in loose.notes)
    huge = planning.plan(profile(), SPEEDS, 100 * 3600)
    assert huge.epochs == planning.MAX_EPOCHS  # an upper bound: early stopping decides
    for budget, plan in ((8 * 3600, loose), (4 * 3600, middle), (3600, tight), (30 * 60, tighter)):
        assert plan.total_seconds <= budget  # the ETA fits the budget
        assert plan.seconds["reserve"] == pytest.approx(0.1 * budget)
        assert plan.seconds["training"] > plan.seconds["prediction"] > 0
    assert "total" in planning.table(loose)


def test_sizes_without_a_speed_are_left_out_and_a_budget_below_one_epoch_says_so_by_its_total():
    only = planning.plan(profile(), {192: SPEEDS[192]}, 4 * 3600)
    assert only.image_size == 192
    tiny = planning.plan(profile(), SPEEDS, 60)
    assert tiny.epochs == 1 and tiny.total_seconds > 60  # the caller stops with a larger-BUDGET line
    with pytest.raises(ValueError, match="no image size"):
        planning.plan(profile(), {}, 3600)


def test_the_plan_is_a_config_the_segment_stage_reads(tmp_path: Path):
    plan = planning.plan(profile(), SPEEDS, 3600)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"segment": planning.segment_section(plan)}))
    segment = load_config(path).segment
    assert (segment.train.image_size, segment.train.epochs, segment.train.patience) == (128, 20, 5)
    assert segment.folds.n_splits == 3 and segment.models[0].label == "unet-r18"  # the default member is kept


def test_a_segmenter_is_timed_on_its_own_steps_cycling_a_sample_smaller_than_its_batches():
    rt = runtime.from_config(RuntimeConfig(device="cpu"), "segmentation")
    torch.manual_seed(0)
    model = rt.prepare(models.create("unet", "resnet18", 2))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    masks = (rng.random((3, 2, 64, 64)) < 0.2).astype(np.uint8)
    train, validate = speed.measure(model, images, masks, 2, 1e-3, "dice_bce", rt, steps=2)
    assert 0 < validate < train < 5  # a backward pass costs more than a forward one


@pytest.mark.parametrize(("one", "expected"), [(0.1, 1), (0.3, 2)])
def test_one_cpu_thread_is_planned_only_when_it_trains_faster_than_the_default(one, expected):
    rt = runtime.from_config(RuntimeConfig(device="cpu"), "segmentation")
    member, train = load_config(None).segment.models[0], load_config(None).segment.train
    found = SimpleNamespace(classes=["a", "b"])  # the speeds are known: nothing is decoded or timed
    key = "unet-resnet18@64px/b16/2cls/dice_bce/cpu/{}t"
    measured = {key.format(2): {"train": 0.2, "validate": 0.05}, key.format(1): {"train": one, "validate": 0.05}}
    default = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert auto._segmentation_threads(member, 64, found, train, Path("unused"), rt, measured) == expected
        assert torch.get_num_threads() == 2  # the default is restored; the caller sets the chosen one
    finally:
        torch.set_num_threads(default)
    assert len(measured) == 2


def _auto(data: Path, work: Path, subs: Path, budget: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "pipeline", "auto", "--data", str(data), "--work", str(work),
                          "--submissions", str(subs), "--budget", budget, "runtime.threads=1",
                          "tracking.backend=none"], capture_output=True, text=True, cwd=REPO, timeout=600)
    return out, time.time() - t0


@pytest.mark.slow
def test_auto_plans_a_segmentation_folder_within_its_budget_and_a_rerun_retrains_nothing(tmp_path: Path):
    data = build_masks(tmp_path / "masks", n_train=24, n_test=6, size=64)
    work, subs = tmp_path / "work", tmp_path / "subs"
    out, wall = _auto(data, work, subs, "120s")
    assert out.returncode == 0, out.stderr[-3000:]
    assert wall <= 120 * 1.1, f"{wall:.0f} s for a 120 s budget"
    log = out.stderr + out.stdout
    for shown in ("auto: profile (segmentation folder)", "auto: measured unet-r18 at 64 px", "auto: plan",
                  "auto: ETA", "segment: epoch 1:", "auto: done"):
        assert shown in log, shown
    assert "label column" not in log
    summary = json.loads((work / "auto" / "summary.json").read_text())
    assert summary["estimated_seconds"] <= 120 and summary["wall_seconds"] <= 132
    assert 0.3 < summary["nested_dice"] <= 1.0
    plan = load_config(work / "plan.yaml")  # a normal config: `make segment CONFIG=WORK/plan.yaml` reads it
    assert plan.segment.train.image_size == 64  # the images' own size: the only candidate at 64 px
    assert plan.segment.train.patience == planning.PATIENCE and plan.runtime.threads == 1
    folds = plan.segment.folds.n_splits
    assert 3 <= folds <= 5 and plan.segment.train.epochs >= 1
    weights = sorted((work / "segment" / "unet-r18").glob("fold*/model.safetensors"))
    assert len(weights) == folds
    facts = json.loads((work / "profile.json").read_text())
    assert facts["facts"]["images"] == 24 and facts["facts"]["image_side"] == 64 and facts["facts"]["classes"] == 3
    assert 0 < facts["facts"]["empty_share"] < 1
    assert list(facts["speeds"]) == ["unet-resnet18@64px/b16/3cls/dice_bce/cpu/1t"]
    comp = load_config(None).competition
    found = read_segmentation(data, comp)
    validate_segmentation(read_submission(Path(summary["submission"])), summary["submission"], found)
    stamps = [p.stat().st_mtime_ns for p in weights]
    again, _ = _auto(data, work, subs, "120s")
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stderr + again.stdout
    assert "auto: measured" not in log and "epoch 1:" not in log  # speeds and every fold model are kept
    assert log.count("model up to date") == folds and "the plan of the earlier run" in log
    assert [p.stat().st_mtime_ns for p in weights] == stamps
    short, _ = _auto(data, work, subs, "5s")
    assert short.returncode == 2 and short.stderr.count("\n") == 1, short.stderr
    assert "auto.budget" in short.stderr and "larger BUDGET" in short.stderr
