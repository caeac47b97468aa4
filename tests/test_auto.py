"""`make auto`: the planners (classification, detection) as pure functions of a profile and a budget, the time limit
of the training loop, and the whole chain on a tiny budget for each track (ends on time with a valid submission; a
rerun keeps what the first one trained)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from timm.scheduler import CosineLRScheduler

from pipeline.core.config import RuntimeConfig, duration_seconds, load_config
from pipeline.core.errors import PipelineError
from pipeline.data.digits import build_digits
from pipeline.detection import planning as detection_planning
from pipeline.detection import speed as detection_speed
from pipeline.detection.planning import DetectionProfile
from pipeline.detection.shapes import build_shapes
from pipeline.detection.torchvision_models import create
from pipeline.scoring.submission import read_submission, validate_detection
from pipeline.training import loop, planning, runtime
from pipeline.training.planning import Member, Profile

from .conftest import REPO


def profile(rows=8000, side=28, device="cpu", test_rows=2000, channels=1) -> Profile:
    return Profile(rows=rows, test_rows=test_rows, task="single_label", n_classes=10, image_side=side,
                   channels=channels, device=device, batch_size=64)


# seconds per image (train, predict): a 2-core CPU at 28-32 px, and a GPU 50x faster
CPU = {"resnet10t": (1.0e-3, 3e-4), "d2l_resnet_small": (1.2e-3, 4e-4), "resnet18": (1.6e-3, 4e-4),
       "resnet26t": (2.5e-3, 8e-4)}
GPU = {b: (t / 50, p / 50) for b, (t, p) in CPU.items()}


def test_durations_read_as_seconds_and_bad_ones_name_the_form():
    assert [duration_seconds(t) for t in ("90s", "25m", "2h", "1.5h", "45", 30)] == [90, 1500, 7200, 5400, 45, 30]
    for bad in ("abc", "10d", "-5m", "0m"):
        with pytest.raises(ValueError, match="90s, 25m or 2h"):
            duration_seconds(bad)
    with pytest.raises(PipelineError, match="auto.budget"):
        load_config(None, ["auto.budget=soon"])


def test_small_images_train_at_their_own_size_with_a_resolution_keeping_stem_beside_timm():
    plan = planning.plan(profile(side=28), CPU, 25 * 60, image_size=28)
    sizes = {m.backbone: m.image_size for m in plan.members}
    assert sizes["d2l_resnet_small"] == 28 and sizes["resnet10t"] == 32
    assert planning.choose_size(profile(side=28), {}, 60) == 28
    assert planning.member_size("resnet18", 56, 0) == 56 and planning.member_size("d2l_resnet_small", 50, 0) == 52


def test_large_images_get_the_largest_size_the_budget_affords():
    big = profile(rows=4000, side=500, channels=3)
    at_224 = {224: 0.05, 64: 0.05 * (64 / 224) ** 2}  # resnet18 on 2 cores
    assert planning.choose_size(big, at_224, 25 * 60) < 224  # 224 px on 2 cores: hours
    assert planning.choose_size(big, {s: t / 100 for s, t in at_224.items()}, 25 * 60) == 224  # a fast GPU
    assert planning.choose_size(profile(rows=4000, side=100, channels=3), {224: 1e-6, 64: 1e-7}, 3600) == 96
    slow, fast = (planning.choose_size(big, at_224, b) for b in (10 * 60, 4 * 3600))
    assert slow < fast


def test_epochs_follow_the_rows_within_bounds():
    assert planning.wanted_epochs(500, 5, 64) == planning.MAX_EPOCHS  # few rows: many epochs
    assert planning.wanted_epochs(100_000, 5, 64) == planning.MIN_EPOCHS  # many rows: few
    assert planning.wanted_epochs(8000, 5, 64) == 15  # 100 steps an epoch: 1,500 steps


def test_a_loose_budget_buys_members_a_tight_one_fewer_epochs_and_folds():
    loose = planning.plan(profile(), CPU, 4 * 3600, image_size=28)
    tight = planning.plan(profile(), CPU, 25 * 60, image_size=28)
    tiny = planning.plan(profile(), CPU, 8 * 60, image_size=28)
    assert loose.n_splits == 5 and len(loose.members) == 4 and all(m.epochs == 15 for m in loose.members)
    assert [m.backbone for m in loose.members] == ["resnet10t", "d2l_resnet_small", "resnet18", "resnet26t"]
    assert 1 <= len(tight.members) < 4
    assert tiny.n_splits == 3 and len(tiny.members) == 1
    assert tiny.members[0].epochs < planning.wanted_epochs(8000, 3, 64)
    assert any("3, not 5" in n for n in tiny.notes) and any("epochs" in n for n in tiny.notes)
    for plan, budget in ((loose, 4 * 3600), (tight, 25 * 60)):
        assert plan.minutes * 60 <= budget * 1.001, plan  # the plan fits what it was given


def test_a_fast_device_buys_more_members_than_a_slow_one_for_the_same_minutes():
    slow = planning.plan(profile(), CPU, 20 * 60, image_size=28)
    fast = planning.plan(profile(device="cuda"), GPU, 20 * 60, image_size=28)
    assert len(fast.members) > len(slow.members)
    assert sum(m.epochs for m in fast.members) > sum(m.epochs for m in slow.members)


def test_diversity_before_more_of_the_same():
    plan = planning.plan(profile(rows=2000), {"resnet10t": CPU["resnet10t"], "resnet18": CPU["resnet18"]},
                         4 * 3600, image_size=28, max_members=4)
    assert [(m.backbone, m.seed) for m in plan.members] == [("resnet10t", 42), ("resnet18", 42), ("resnet10t", 43),
                                                            ("resnet18", 43)]
    assert len({m.name for m in plan.members}) == 4


def test_kept_members_stay_first_and_their_remaining_minutes_count():
    kept = Member("resnet10t-32px-none", "resnet10t", 32, 15, 42, minutes=10.0)
    free = planning.plan(profile(), CPU, 40 * 60, image_size=28, symmetry="none")
    plan = planning.plan(profile(), CPU, 40 * 60, image_size=28, symmetry="none", pinned=[kept], folds=5)
    assert plan.members[0] == kept and plan.n_splits == 5
    assert ("resnet10t", 42) not in [(m.backbone, m.seed) for m in plan.members[1:]]
    assert plan.minutes <= 40 * 1.001
    assert len(plan.members) <= len(free.members) + 1


def test_the_plan_is_a_config_that_loads_with_the_symmetry_in_every_member(tmp_path: Path):
    plan = planning.plan(profile(), CPU, 3600, image_size=28, symmetry="d4")
    cfg = planning.plan_config(plan, {"competition": {"name": "x"}, "model": {"only": ["a"]}})
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path)
    assert loaded.folds.n_splits == plan.n_splits and loaded.competition.name == "x" and loaded.model.only is None
    names = loaded.model.experiment_names()
    assert names == [m.name for m in plan.members]
    entry = loaded.model.backbones[0]
    assert entry.train["hflip"] is True and [list(t)[0] for t in entry.train["transforms"]] == [
        "VerticalFlip", "RandomRotate90"]
    assert entry.predict["tta"] == ["identity", "hflip", "vflip", "rot90"]
    assert planning.symmetry_train("none") == {"hflip": False} and planning.symmetry_views("none") == ["identity"]
    assert "total" in planning.table(plan)


def test_integer_labels_become_a_number_only_when_it_wins_on_both_scores():
    counts = ({"rmse": 0.12, "accuracy": 0.985}, {"rmse": 0.03, "accuracy": 0.999})
    digits = ({"rmse": 0.45, "accuracy": 0.990}, {"rmse": 0.40, "accuracy": 0.62})
    assert planning.label_as_number(*counts, 1.4) and not planning.label_as_number(*digits, 2.9)
    assert not planning.label_as_number({"rmse": 0.1, "accuracy": 0.9}, {"rmse": 0.1, "accuracy": 0.95}, 1.4)  # tie
    chance = ({"rmse": 2.86, "accuracy": 0.102}, {"rmse": 2.50, "accuracy": 0.104})  # runs that learnt nothing
    assert not planning.label_as_number(*chance, 2.87)
    from pipeline.data.labels import is_integer
    assert [is_integer(t) for t in ("3", "-1", "4.0", "4.5", "cat", "")] == [True, True, True, False, False, False]


class _SlowTrack:
    """A track whose epochs take `seconds` each (the loop's time limit is what is tested)."""

    def __init__(self, seconds: float):
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        self.updater = loop.Updater(model, optimizer, CosineLRScheduler(optimizer, t_initial=10))
        self.seconds = seconds

    def reseed(self, epoch, epoch_seed):
        pass

    def train_epoch(self, epoch):
        time.sleep(self.seconds)
        return {"train_loss": 1.0}

    def validate(self):
        return {"val": 0.5}

    def end_epoch(self, epoch, monitored):
        pass

    def describe(self, row):
        return ""


def test_a_time_limit_stops_a_fit_at_an_epoch_end_and_a_rerun_resumes_after_it(tmp_path: Path):
    saver = loop.CheckpointSaver(tmp_path, "fp")
    with loop.time_limit(time.time() + 0.35), pytest.raises(loop.TimeUp, match="stopped after epoch 1"):
        loop.fit(_SlowTrack(0.25), saver, epochs=5, seed=0, label="run", monitor="val", say=lambda s: None)
    said = []
    progress = loop.fit(_SlowTrack(0.0), saver, epochs=3, seed=0, label="run", monitor="val", say=said.append)
    assert "run resumes after epoch 1" in said and progress.epoch == 3
    with loop.time_limit(time.time() - 1), pytest.raises(loop.TimeUp, match="not started"):
        loop.fit(_SlowTrack(0.0), loop.CheckpointSaver(tmp_path / "b", "fp"), epochs=2, seed=0, label="other",
                 monitor="val", say=lambda s: None)
    assert loop.fit(_SlowTrack(0.0), loop.CheckpointSaver(tmp_path / "c", "fp"), epochs=1, seed=0, label="x",
                    monitor="val", say=lambda s: None).epoch == 1  # no limit outside the block


def detection_profile(images=1500, classes=10, side=128, p10=0.2, device="cpu") -> DetectionProfile:
    return DetectionProfile(images=images, val_images=200, test_images=300, classes=classes, boxes=int(2.5 * images),
                            image_side=side, box_p10=p10, box_median=1.6 * p10, device=device)


# seconds per image (training, validation) of FCOS at 128 px: resnet10t on one CPU thread (configs/detect-small.yaml's
# ~30 s epochs of 1,200 images), and each CUDA backbone; the crop classifier's per 32 px crop (training, prediction)
CPU_DETECTOR = {"resnet10t": (0.025, 0.012)}
GPU_DETECTOR = {"resnet34": (0.004, 0.002), "resnet18": (0.0025, 0.0012), "resnet10t": (0.0015, 0.001)}
CPU_CROPS, GPU_CROPS = (3e-3, 8e-4), (2e-4, 5e-5)


def test_a_detection_plan_buys_folds_epochs_and_the_classifier_with_the_budget():
    shapes = detection_profile()
    loose = detection_planning.plan(shapes, CPU_DETECTOR, 4 * 3600, crop_speed=CPU_CROPS)
    tight = detection_planning.plan(shapes, CPU_DETECTOR, 20 * 60, crop_speed=CPU_CROPS)
    tiny = detection_planning.plan(shapes, CPU_DETECTOR, 5 * 60, crop_speed=CPU_CROPS)
    assert (loose.n_splits, loose.epochs) == (5, detection_planning.MAX_EPOCHS) and loose.classifier_epochs >= 10
    assert tight.n_splits == 3 and detection_planning.FLOOR_EPOCHS <= tight.epochs < loose.epochs
    assert tight.classifier_epochs == 0 and any("no crop classifier" in n for n in tight.notes)
    assert tiny.n_splits == 1 and tiny.classifier_epochs == 0 and tiny.epochs >= 1
    assert any("not 5" in n for n in tight.notes) and any("not 3" in n for n in tiny.notes)
    for plan, budget in ((loose, 4 * 3600), (tight, 20 * 60), (tiny, 5 * 60)):
        assert plan.total_seconds <= budget, plan  # the estimate, reserve included, fits what it was given
        assert plan.patience == detection_planning.PATIENCE and plan.seconds["reserve"] == 0.1 * budget
    assert loose.backbone == "resnet10t" and loose.fpn_channels == 64 and loose.crop_size == 32
    assert (loose.image_size, loose.mosaic) == (128, 0.3)  # the shapes' own size; their objects keep mosaic
    assert "total" in detection_planning.table(loose)
    for minutes in (3, 6, 12, 25, 45, 90, 240):  # the rule at every budget where one epoch of one model fits
        plan = detection_planning.plan(shapes, CPU_DETECTOR, minutes * 60, crop_speed=CPU_CROPS)
        assert plan.total_seconds <= minutes * 60 or (plan.n_splits, plan.epochs) == (1, 1), (minutes, plan)
    with pytest.raises(ValueError, match="measured speed"):
        detection_planning.plan(shapes, {"resnet50": (1.0, 1.0)}, 3600)


def test_a_detection_plan_sizes_the_images_by_their_side_and_the_smallest_boxes():
    small = detection_profile(side=1000, p10=0.01)
    large = detection_profile(side=1000, p10=0.3)
    assert detection_planning.image_size(small) == 512  # the images' 1024 px, capped on the CPU
    assert detection_planning.image_size(dataclasses.replace(small, device="cuda")) == 1024
    assert detection_planning.image_size(large) == 128  # a 30% box still spans 38 px at 128 px
    assert detection_planning.image_size(detection_profile(side=100)) == 128  # a multiple of 32, no smaller
    speeds = {"resnet10t": (0.025 * (512 / 128) ** 2, 0.012 * (512 / 128) ** 2)}
    plan = detection_planning.plan(small, speeds, 4 * 3600, crop_speed=CPU_CROPS)
    assert plan.image_size == 512 and plan.mosaic == 0.0 and any("small objects" in n for n in plan.notes)
    assert detection_planning.plan(large, CPU_DETECTOR, 4 * 3600).mosaic == 0.3


def test_one_class_has_no_crop_classifier_and_cuda_plans_a_larger_backbone_and_crops():
    one = detection_planning.plan(detection_profile(classes=1), CPU_DETECTOR, 4 * 3600, crop_speed=CPU_CROPS)
    assert one.classifier_epochs == 0 and any("one class" in n for n in one.notes)
    gpu = detection_profile(device="cuda")
    loose = detection_planning.plan(gpu, GPU_DETECTOR, 3600, crop_speed=GPU_CROPS)
    tight = detection_planning.plan(gpu, GPU_DETECTOR, 8 * 60, crop_speed=GPU_CROPS)
    assert (loose.backbone, loose.fpn_channels, loose.crop_size) == ("resnet34", 128, 64)
    assert loose.n_splits == 5 and loose.classifier_epochs > 0 and loose.fusion["conf"] == ["avg", "max"]
    assert tight.backbone in ("resnet18", "resnet10t") and any("backbone" in n for n in tight.notes)
    assert loose.total_seconds <= 3600 and tight.total_seconds <= 8 * 60
    cpu = detection_planning.plan(detection_profile(), CPU_DETECTOR, 3600, crop_speed=CPU_CROPS)
    assert len(cpu.fusion["iou"]) * len(cpu.fusion["skip"]) * len(cpu.fusion["conf"]) == 4  # a small grid on CPU


def test_a_detector_is_timed_on_its_own_losses_cycling_a_sample_smaller_than_its_batches():
    rt = runtime.from_config(RuntimeConfig(device="cpu"), "detection")
    torch.manual_seed(0)
    model = rt.prepare(create("fcos", 2, 64, "resnet10t", 32))
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    targets = torch.tensor([[[0, 0.1, 0.1, 0.5, 0.5]], [[1, 0.4, 0.3, 0.9, 0.8]], [[0, 0.2, 0.5, 0.6, 0.9]]])
    train, validate = detection_speed.measure(model, images, targets, torch.full((3, 2), 64.0), 2, 0.01, rt, steps=2)
    assert 0 < validate and 0 < train < 10  # seconds per image of a 64 px FCOS step on the CPU


def test_the_detection_plan_is_a_config_the_detect_stage_reads(tmp_path: Path):
    plan = detection_planning.plan(detection_profile(), CPU_DETECTOR, 4 * 3600, crop_speed=CPU_CROPS)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"competition": {"name": "x"},
                                    "detect": detection_planning.detect_section(plan)}))
    detect = load_config(path).detect
    assert (detect.model.name, detect.model.backbone, detect.model.fpn_channels) == ("fcos", "resnet10t", 64)
    assert (detect.folds.n_splits, detect.train.epochs, detect.train.patience) == (5, plan.epochs, 4)
    assert detect.train.image_size == 128 and detect.classifier.enabled
    assert (detect.classifier.train.image_size, detect.classifier.train.epochs) == (32, plan.classifier_epochs)
    assert detect.fusion.iou == plan.fusion["iou"] and detect.views.scales == [1.0]


def test_a_bad_budget_is_one_line(tmp_path: Path):
    detection = tmp_path / "boxes"
    detection.mkdir()
    (detection / "train.csv").write_text("image,label,xmin,ymin,xmax,ymax\na.png,cat,1,2,3,4\n")
    for data in (tmp_path, detection):
        out = subprocess.run([sys.executable, "-m", "pipeline", "auto", "--data", str(data), "--work",
                              str(tmp_path / "w"), "--budget", "soon"], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "90s, 25m or 2h" in out.stderr, out.stderr


def _auto(data: Path, work: Path, subs: Path, budget: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "pipeline", "auto", "--data", str(data), "--work", str(work),
                          "--submissions", str(subs), "--budget", budget, "runtime.threads=1", "clean.workers=1",
                          "tracking.backend=none", "auto.candidates=[d2l_lenet,d2l_resnet_small]"],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    return out, time.time() - t0


@pytest.mark.slow
def test_auto_on_a_tiny_budget_ends_on_time_with_a_valid_submission_and_a_rerun_keeps_it(tmp_path: Path):
    data = build_digits(tmp_path / "digits", limit=300)
    work, subs = tmp_path / "work", tmp_path / "subs"
    out, wall = _auto(data, work, subs, "100s")
    assert out.returncode == 0, out.stderr[-3000:]
    assert wall <= 100 * 1.1 + 8, f"{wall:.0f} s for a 100 s budget (8 s: the interpreter's start and imports)"
    log = first_log = out.stderr + out.stdout
    for shown in ("auto: profile", "auto: plan", "ETA", "honest CV"):
        assert shown in log, shown
    summary = json.loads((work / "auto" / "summary.json").read_text())
    assert summary["members"] and summary["budget_seconds"] == 100 and summary["wall_seconds"] <= 110
    assert isinstance(summary["honest_score"], float) and 0.2 < summary["honest_score"] <= 1.0
    check = subprocess.run([sys.executable, "-m", "pipeline", "validate-submission", summary["submission"],
                            "--data", str(data)], capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 0, check.stderr
    plan = load_config(work / "plan.yaml")  # a normal config
    assert set(summary["members"]) <= set(plan.model.experiment_names())
    speeds = json.loads((work / "profile.json").read_text())["speeds"]
    assert speeds and all(v["train"] > 0 for v in speeds.values())
    first = (work / "ensemble" / "weights.json").stat().st_mtime_ns
    again, _ = _auto(data, work, subs, "100s")
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stderr + again.stdout
    measured = r"measured (\S+ at \d+ px)"
    remeasured = set(re.findall(measured, log)) & set(re.findall(measured, first_log))
    assert not remeasured and "probe:" not in log  # speeds and the probe's decision are kept
    assert "epoch 1:" not in log  # nothing retrained
    assert (work / "ensemble" / "weights.json").stat().st_mtime_ns == first  # the ensemble is up to date
    # a later stage with the same DATA and WORK and no config continues on the plan, the finished members only
    later = subprocess.run([sys.executable, "-m", "pipeline", "ensemble", "--data", str(data), "--work", str(work),
                            "--submissions", str(subs)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert later.returncode == 0, later.stderr[-3000:]
    log = later.stderr + later.stdout
    assert f"{work / 'plan.yaml'} model.only=[{','.join(summary['members'])}]" in log
    assert "epoch 1:" not in log and "ensemble: up to date" in log
    assert (work / "ensemble" / "weights.json").stat().st_mtime_ns == first


def _auto_detect(data: Path, work: Path, subs: Path, budget: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "pipeline", "auto", "--data", str(data), "--work", str(work),
                          "--submissions", str(subs), "--budget", budget, "runtime.threads=1",
                          "tracking.backend=none"], capture_output=True, text=True, cwd=REPO, timeout=600)
    return out, time.time() - t0


@pytest.mark.slow
def test_auto_plans_a_detection_folder_within_its_budget_and_a_rerun_retrains_nothing(tmp_path: Path):
    data = build_shapes(tmp_path / "shapes", n_train=24, n_val=6, n_test=6, seed=2)
    work, subs = tmp_path / "work", tmp_path / "subs"
    out, wall = _auto_detect(data, work, subs, "100s")
    assert out.returncode == 0, out.stderr[-3000:]
    assert wall <= 100 * 1.1, f"{wall:.0f} s for a 100 s budget"
    log = out.stderr + out.stdout
    for shown in ("auto: profile (detection folder)", "auto: plan", "auto: ETA", "detect: epoch 1:", "auto: done"):
        assert shown in log, shown
    summary = json.loads((work / "auto" / "summary.json").read_text())
    assert summary["estimated_seconds"] <= 100 and summary["wall_seconds"] <= 110
    plan = load_config(work / "plan.yaml")  # a normal config: `make detect CONFIG=WORK/plan.yaml` reads it
    assert plan.detect.model.name == "fcos" and plan.detect.train.image_size == 128
    assert plan.detect.train.patience == detection_planning.PATIENCE and plan.runtime.threads == 1
    folds = plan.detect.folds.n_splits
    assert len(list((work / "detect").glob("fcos-resnet10t/fold*/model.safetensors"))) == folds
    speeds = json.loads((work / "profile.json").read_text())["speeds"]
    assert any(k.startswith("fcos-resnet10t-fpn64@128px") for k in speeds)
    assert all(v["train"] > 0 for v in speeds.values())
    frame = read_submission(Path(summary["submission"]))
    test_images = sorted(p.split(",")[0] for p in (data / "test.csv").read_text().splitlines()[1:])
    validate_detection(frame, summary["submission"], test_images, sorted({r.split(",")[1] for r in (
        data / "train.csv").read_text().splitlines()[1:]}))
    again, _ = _auto_detect(data, work, subs, "100s")
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stderr + again.stdout
    assert "auto: measured" not in log and "epoch 1:" not in log  # speeds and every trained model are kept
    assert log.count("model up to date") == folds and "the plan of the earlier run" in log
    short, _ = _auto_detect(data, work, subs, "5s")
    assert short.returncode == 2 and short.stderr.count("\n") == 1, short.stderr
    assert "auto.budget" in short.stderr and "larger BUDGET" in short.stderr
