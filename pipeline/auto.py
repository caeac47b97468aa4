"""`make auto`: profile the competition, measure the candidates' speed, plan a portfolio for a time budget, run it.

Above orchestrate (it chains whole stage runs under plans it writes), below the CLI. The steps, each printed:

1. clean (the user's config), then the profile: rows, classes and their balance, the task, image sizes and modes,
   duplicates and conflicts, and each candidate's measured seconds per image (WORK/profile.json; a rerun reuses the
   measurements of the same backbone, size, batch and device);
2. a first plan (training/planning.py): folds, the image size, member one and its epochs;
3. the probe: member one's fold 0 trained with no flips, mirror flips and (when mirrors help) all eight flips and
   rotations; the best validation score decides the symmetry every member trains and predicts with, and member one's
   winning fold 0 is kept. Its epochs' real seconds calibrate every estimate;
4. the plan (WORK/plan.yaml, a normal config: `make folds train ensemble CONFIG=WORK/plan.yaml` reproduces it),
   printed as a table; members train in order, an ETA line after each, every fit stopping at an epoch's end when
   the budget's training share is spent (training/loop.py's time limit);
5. predict and ensemble on the finished members (a member with missing folds is left out, and said so): the
   submission and its honest score.

A rerun keeps the plan's members (finished ones cost nothing, an interrupted one resumes from its last epoch); after
a run that ended, only a larger budget adds members, planned in the added time.

A detection folder (box columns in train.csv) is profiled by the detect stage's reader, the planned detector and the
crop classifier are timed on this device, detection/planning.py plans the detect keys for the budget (WORK/plan.yaml,
which `make detect CONFIG=WORK/plan.yaml` reproduces), and the detect stage runs on it (_run_detection).

A segmentation folder (masks in train.csv or a masks/ folder) is profiled by the segment stage's reader, the default
member (segment.models' first) is timed on this device at candidate sizes, segmentation/planning.py plans the image
size, folds and epochs for the budget (WORK/plan.yaml, which `make segment CONFIG=WORK/plan.yaml` reproduces), and the
segment stage runs on it (_run_segmentation).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
import yaml
from huggingface_hub import try_to_load_from_cache
from PIL import Image

from pipeline import orchestrate
from pipeline.context import Context
from pipeline.core.artifacts import content_key, read_json, write_json, write_text
from pipeline.core.config import SegmentMemberConfig, SegmentTrainConfig, duration_seconds, load_config
from pipeline.core.errors import PipelineError
from pipeline.data import labels
from pipeline.data.cache import cached_decode
from pipeline.data.quality import clean_csv
from pipeline.detection import planning as detection_planning
from pipeline.detection import speed as detection_speed
from pipeline.detection.data import Arrays, DetectionData, is_detection_folder, read_detection, split_arrays
from pipeline.detection.torchvision_models import create
from pipeline.segmentation import models as segmentation_models
from pipeline.segmentation import planning as segmentation_planning
from pipeline.segmentation import speed as segmentation_speed
from pipeline.segmentation.arrays import resize_mask
from pipeline.segmentation.data import SegmentationData, is_segmentation_folder
from pipeline.stages import segment as segment_stage
from pipeline.training import planning, runtime, speed
from pipeline.training.inference import fold_values
from pipeline.training.loop import TimeUp, time_limit

log = logging.getLogger(__name__)

SIDE_SAMPLE = 500  # image headers read for the size profile (a header costs microseconds; 500 pin the median)
PROBE_FOLD = 0
SHORT_BUDGET = 600  # seconds; below it only the candidates a first plan can hold are timed
PROBE_SHARE = 0.25  # the probe's extra fold-0 runs may take up to this share of the time left
PROBED_PLAN_SHARE = 0.6  # member one is sized in this share of the time, so that 5 folds leave the probe its room


def run(data: Path, config: Path | None, overrides: list[str], work: Path | None, submissions: Path,
        budget: str | None = None) -> dict:
    """The whole chain inside the budget (auto.budget, or `budget` when given); returns the final summary."""
    started = time.time()
    if is_detection_folder(Path(data)):
        return _run_detection(Path(data), config, overrides, work, submissions, budget, started)
    files = load_config(config, overrides).segment.data  # the names the segment stage reads the folder by
    if is_segmentation_folder(Path(data), files.train_csv, files.test_csv, files.masks_dir):
        return _run_segmentation(Path(data), config, overrides, work, submissions, budget, started)
    overrides = [*overrides, *([f"auto.budget={budget}"] if budget else [])]  # checked like any key
    ctx = orchestrate.context("clean", config, overrides, data, work, submissions, use_tuned=False, use_plan=False)
    budget_s = duration_seconds(ctx.cfg.auto.budget)
    deadline = started + budget_s
    log.info(f"auto: budget {budget_s / 60:.1f} min, ends by {time.strftime('%H:%M:%S', time.localtime(deadline))}")
    orchestrate.run("clean", ctx)
    rt = runtime.from_config(ctx.cfg.runtime, "classification")
    runtime.set_threads(ctx.cfg.runtime.threads)
    facts, profile = _profile(ctx, rt.device.type)
    measured = _read(ctx.work_dir / "profile.json").get("speeds", {})
    threads = ctx.cfg.runtime.threads or _fastest_threads(profile, rt, measured)
    if threads != torch.get_num_threads():
        runtime.set_threads(threads)
        overrides = [*overrides, f"runtime.threads={threads}"]
    base = load_config(config, overrides).model_dump(mode="json", exclude_defaults=True)
    base.pop("auto", None)
    auto_dir = ctx.work_dir / "auto"
    decisions = _read(auto_dir / "decisions.json")
    if decisions.get("profile") != facts:  # another folder or config in this WORK: nothing earlier applies
        decisions = {}
    size = decisions.get("image_size") or _choose_size(profile, ctx, rt, measured, deadline - time.time())
    settings = dict(max_members=ctx.cfg.auto.max_members, reserve=ctx.cfg.auto.reserve,
                    candidates=ctx.cfg.auto.candidates)
    speeds = _measure_candidates(profile, size, ctx, rt, measured, deadline, settings)
    write_json(ctx.work_dir / "profile.json", {"facts": facts, "speeds": measured})
    _print_profile(facts, speeds, size)
    plan_path = ctx.work_dir / "plan.yaml"
    kept = _kept_members(auto_dir / "members.json", _active(ctx, decisions), decisions) if decisions else []
    if not decisions:
        left = deadline - time.time()
        first = planning.plan(profile, speeds, left * PROBED_PLAN_SHARE, image_size=size, **settings)
        if not ctx.cfg.auto.probe or 2 * _fold_seconds(first) > PROBE_SHARE * left:
            first = planning.plan(profile, speeds, left, image_size=size, **settings)
            decisions = {"symmetry": "hflip", "probe_scores": {}, "calibration": planning.CALIBRATION,
                         "member": None}
            why = "auto.probe=false" if not ctx.cfg.auto.probe else (
                f"two more fold-0 runs ({2 * _fold_seconds(first) / 60:.1f} min) would take over {PROBE_SHARE:.0%} "
                "of the time left")
            log.info(f"auto: probe skipped ({why}); members train with mirror flips, the usual symmetry of photos; "
                     "predict keeps the hflip view only where it helps OOF")
        else:
            decisions = _probe(first, base, data, work, submissions, ctx, deadline, profile, speeds)
        decisions |= {"profile": facts, "image_size": size, "n_splits": first.n_splits, "as_number": False}
        if _integer_classes(ctx, config, overrides):
            decisions |= _task_probe(decisions, first, base, data, ctx, submissions, deadline, rt)
        write_json(auto_dir / "decisions.json", decisions)
        kept = [] if not decisions["member"] else [
            _remaining(decisions["member"], _active(ctx, decisions), first.n_splits)]
    active = _active(ctx, decisions)
    if decisions.get("as_number"):  # the task probe chose a number: the rest runs in the regression branch's WORK
        overrides = [*overrides, "competition.task=regression"]
        base = {**base, "competition": {**base.get("competition", {}), "task": "regression"}}
        profile = dataclasses.replace(profile, task="regression", n_classes=1)
        plan_path = active / "plan.yaml"
    room = deadline - time.time()
    completed = _read(auto_dir / "summary.json")
    if kept and completed:  # an earlier run ended with its plan done: new members get only the added budget
        room = min(room, budget_s - completed["budget_seconds"])
    plan = planning.plan(profile, speeds, room, image_size=size, symmetry=decisions["symmetry"],
                         calibration=decisions["calibration"], pinned=kept, folds=decisions["n_splits"],
                         **settings)
    _write_plan(plan, plan_path, auto_dir, base, decisions)
    log.info(f"auto: plan ({plan_path}; `make folds train ensemble CONFIG={plan_path}` reproduces it)\n"
             + planning.table(plan) + "".join(f"\n  {n}" for n in plan.notes))
    finished = _train_members(plan, plan_path, data, active, submissions, deadline, started, budget_s)
    while finished and not completed:  # estimates were high: more members in the time left, at the real speed
        calibration = _calibration(active, plan, profile, speeds) or decisions["calibration"]
        tried = [dataclasses.replace(m, minutes=0.0) for m in plan.members]
        more = planning.plan(profile, speeds, deadline - time.time(), image_size=size, symmetry=decisions["symmetry"],
                             calibration=calibration, pinned=tried, folds=decisions["n_splits"], **settings)
        if len(more.members) == len(tried):
            break
        added = dataclasses.replace(more, members=more.members[len(tried):])
        plan = dataclasses.replace(more, members=plan.members + added.members)
        _write_plan(plan, plan_path, auto_dir, base, decisions)
        log.info(f"auto: time left for more members (epochs take {calibration:.2f}x the measured steps' time)\n"
                 + planning.table(added))
        finished += _train_members(added, plan_path, data, active, submissions, deadline, started, budget_s)
    if not finished:
        raise PipelineError(f"auto: no member finished all {plan.n_splits} folds within the budget "
                            f"({budget_s / 60:.1f} min); give a larger BUDGET (a rerun keeps the trained folds)")
    only = [f"model.only=[{','.join(finished)}]"]
    ectx = orchestrate.context("ensemble", plan_path, only, data, active, submissions, use_tuned=False)
    orchestrate.run("ensemble", ectx)
    result = _summary(ectx, started, budget_s, finished)
    return _write_summary(ctx.work_dir, result, plan_path, active, only)


# --- profile -----------------------------------------------------------------------------------------------------

def _profile(ctx: Context, device: str) -> tuple[dict, planning.Profile]:
    """The competition's facts (printed, saved in profile.json) and the planner's Profile of them."""
    comp = ctx.competition
    clean = read_json(ctx.work_dir / "clean.json", "run `make clean-data`")
    kept = pd.read_csv(ctx.work_dir / "clean.csv", dtype=str, keep_default_na=False)
    paths = list(comp.train["path"])
    rng = np.random.default_rng(0)
    sample = [paths[i] for i in sorted(rng.choice(len(paths), min(SIDE_SAMPLE, len(paths)), replace=False))]
    sides, modes = [], {}
    for p in sample:
        with Image.open(p) as im:
            sides.append(min(im.size))
            modes[im.mode] = modes.get(im.mode, 0) + 1
    task = ctx.cfg.competition.task
    counts = kept["label"].value_counts() if task == "single_label" else pd.Series(dtype=int)
    channels = ctx.input_channels()
    facts = {"rows": len(kept), "test_rows": len(comp.test), "task": task, "metric": ctx.cfg.competition.metric,
             "classes": len(comp.classes) if task in ("single_label", "multi_label") else 1,
             "smallest_class": int(counts.min()) if len(counts) else None,
             "largest_class": int(counts.max()) if len(counts) else None,
             "side_median": int(np.median(sides)), "side_p10": int(np.percentile(sides, 10)),
             "side_p90": int(np.percentile(sides, 90)), "modes": modes, "channels": channels,
             "exact_pairs": clean.get("exact_pairs", 0),
             "near_pairs": clean.get("near_pairs", 0) + clean.get("small_pairs", 0) + clean.get("sparse_pairs", 0),
             "conflicts_dropped": clean.get("conflicts_dropped", 0), "device": device}
    batch = 64 if device == "cpu" else 128
    weights = _weights_at_hand(ctx)
    facts["imagenet_weights"] = sorted(weights)
    profile = planning.Profile(rows=len(kept), test_rows=len(comp.test), task=task,
                               n_classes=max(1, facts["classes"]), image_side=facts["side_median"],
                               channels=channels, device=device, batch_size=batch, weights=weights)
    return facts, profile


def _weights_at_hand(ctx: Context) -> frozenset[str]:
    """The ladder's timm backbones whose ImageNet weights are in the hub cache (fine-tuned offline); none when the
    user's config already says where weights come from (model.pretrained or model.pretrained_path: kept as given)."""
    model = ctx.cfg.model
    if model.pretrained or model.pretrained_path:
        return frozenset()
    found = set()
    for backbone in set(planning.SMALL_LADDER + planning.LARGE_LADDER + tuple(ctx.cfg.auto.candidates or ())):
        if timm.is_model(backbone):
            hub_id = timm.models.get_pretrained_cfg(backbone).hf_hub_id
            if hub_id and isinstance(try_to_load_from_cache(hub_id, "model.safetensors"), str):
                found.add(backbone)
    if not found:
        log.info("auto: no ImageNet weights in the hub cache: members start from random weights (go online once "
                 "with model.pretrained=true, or set model.pretrained_path, to fine-tune)")
    return frozenset(found)


def _speed(backbone: str, size: int, profile: planning.Profile, rt: runtime.Runtime,
           measured: dict) -> tuple[float, float]:
    """(train, predict) seconds per image of `backbone` at `size`, measured once per machine setting."""
    key = f"{backbone}@{size}px/b{profile.batch_size}/{profile.channels}ch/{rt.device.type}/{torch.get_num_threads()}t"
    if key not in measured:
        t0 = time.perf_counter()
        s = speed.measure(backbone, size, profile.channels, profile.n_classes, profile.batch_size, rt)
        measured[key] = {"train": s.train, "predict": s.predict}
        log.info(f"auto: measured {backbone} at {size} px: {1 / s.train:.0f} training and {1 / s.predict:.0f} "
                 f"predicted images/s ({time.perf_counter() - t0:.1f} s)")
    return measured[key]["train"], measured[key]["predict"]


def _fastest_threads(profile: planning.Profile, rt: runtime.Runtime, measured: dict) -> int:
    """On the CPU, torch's default threads or one thread, whichever trains the first candidate faster here: beside
    other busy processes torch's threads wait on each other, and one thread can be several times faster."""
    default = torch.get_num_threads()
    if rt.device.type != "cpu" or default == 1:
        return default
    first = planning.ladder(profile)[0]
    size = planning.member_size(first, profile.image_side, min(planning.SIZES))
    seconds = {}
    for n in (default, 1):
        torch.set_num_threads(n)
        seconds[n] = _speed(first, size, profile, rt, measured)[0]
    torch.set_num_threads(default)
    best = min(seconds, key=seconds.get)
    if best != default:
        log.info(f"auto: one CPU thread trains {seconds[default] / seconds[1]:.1f}x faster than {default} here (other "
                 "processes share the cores): runtime.threads=1")
    return best


def _choose_size(profile: planning.Profile, ctx: Context, rt: runtime.Runtime, measured: dict,
                 seconds_left: float) -> int:
    """The image size: native for small images; else the planner's pick from the first backbone's measured speed
    at the largest and smallest candidate sizes."""
    if planning.is_small(profile.image_side):
        return planning.choose_size(profile, {}, seconds_left)
    first = planning.ladder(profile, ctx.cfg.auto.candidates)[0]
    sizes = [s for s in planning.SIZES if s <= max(profile.image_side, planning.SIZES[-1])]
    at = {s: _speed(first, s, profile, rt, measured)[0] for s in {sizes[0], sizes[-1]}}
    return planning.choose_size(profile, at, seconds_left)


def _measure_candidates(profile: planning.Profile, size: int, ctx: Context, rt: runtime.Runtime, measured: dict,
                        deadline: float, settings: dict) -> dict[str, tuple[float, float]]:
    """The ladder's first backbone, then up to auto.max_members of the ladder; under SHORT_BUDGET only as many as a
    plan could hold were they as fast (each measurement costs seconds that a tight budget would rather train with;
    a member planned later, when early ones ran faster than estimated, needs its speed)."""
    ladder = planning.ladder(profile, ctx.cfg.auto.candidates)
    speeds = {ladder[0]: _speed(ladder[0], planning.member_size(ladder[0], profile.image_side, size), profile, rt,
                                measured)}
    alike = {b: speeds[ladder[0]] for b in ladder}
    guess = planning.plan(profile, alike, deadline - time.time(), image_size=size, **settings)
    wanted = len(guess.members) if deadline - time.time() < SHORT_BUDGET else settings["max_members"]
    for b in ladder[1:max(len(guess.members), wanted)]:
        speeds[b] = _speed(b, planning.member_size(b, profile.image_side, size), profile, rt, measured)
    return speeds


def _print_profile(facts: dict, speeds: dict, size: int) -> None:
    lines = [f"  rows {facts['rows']} train, {facts['test_rows']} test; task {facts['task']} "
             f"({facts['metric']}), {facts['classes']} classes"
             + (f" ({facts['smallest_class']}-{facts['largest_class']} rows each)" if facts["smallest_class"] else ""),
             f"  images: shorter side {facts['side_median']} px (10-90%: {facts['side_p10']}-{facts['side_p90']}), "
             f"modes {facts['modes']}, {facts['channels']} input channel(s); planned size {size} px",
             f"  clean: {facts['exact_pairs']} exact and {facts['near_pairs']} near duplicate pairs, "
             f"{facts['conflicts_dropped']} conflicting rows dropped",
             f"  speed on {facts['device']} ({torch.get_num_threads()} threads), images/s training | predicting:"]
    lines += [f"    {b:<20} {1 / t:>8.0f} | {1 / p:.0f}" for b, (t, p) in speeds.items()]
    log.info("auto: profile\n" + "\n".join(lines))


# --- probe: which symmetries keep the label -----------------------------------------------------------------------

def _probe(first: planning.Plan, base: dict, data: Path, work: Path | None, submissions: Path, ctx: Context,
           deadline: float, profile: planning.Profile, speeds: dict) -> dict:
    """Member one's fold 0 under each symmetry (hflip, none, then d4 when mirrors helped); the best validation score
    wins. Returns the decision, the scores, the winning member and the calibration of estimates to real epochs."""
    lead = first.members[0]
    fold_cost = _fold_seconds(first)
    variants = {sym: planning.Member(planning.member_name(lead.backbone, lead.image_size, lead.seed, sym),
                                     lead.backbone, lead.image_size, lead.epochs, lead.seed, lead.minutes)
                for sym in planning.SYMMETRIES}
    probe_cfg = planning.plan_config(first, base)
    probe_cfg["model"]["backbones"] = [planning.member_entry(m, sym, first.weights) for sym, m in variants.items()]
    path = ctx.work_dir / "auto" / "probe.yaml"
    write_text(path, yaml.safe_dump(probe_cfg, sort_keys=False))
    scores: dict[str, float] = {}
    greater = True
    seconds = []
    for sym in planning.SYMMETRIES:
        if sym == "d4" and (scores.get("hflip", -math.inf) < scores.get("none", -math.inf)
                            or time.time() + fold_cost > deadline - first.reserve_minutes * 60 - lead.minutes * 60):
            break  # mirrors did not help, or no room left for a third fold-0 run beside the plan
        name = variants[sym].name
        pctx = orchestrate.context("train", path, [f"model.only=[{name}]", f"train.folds=[{PROBE_FOLD}]"], data, work,
                                   submissions, use_tuned=False)
        log.info(f"auto: probe: {name} fold {PROBE_FOLD} ({sym}: {_SYMMETRY_TEXT[sym]})")
        with time_limit(deadline - first.reserve_minutes * 60):
            try:
                orchestrate.run("train", pctx)
            except TimeUp as exc:
                raise PipelineError(f"auto: {exc}; the budget does not cover one fold of the first member; give a "
                                    "larger BUDGET (a rerun resumes the run)") from None
        meta = read_json(ctx.work_dir / "runs" / name / f"fold{PROBE_FOLD}" / "best.json", "rerun `make auto`")
        scores[sym], greater = meta["metric"], meta["greater_is_better"]
        history = pd.read_csv(ctx.work_dir / "runs" / name / f"fold{PROBE_FOLD}" / "history.csv")
        seconds.append(float(history["seconds"].median()))
    best = (max if greater else min)(scores, key=scores.get)
    predicted = planning.epoch_seconds(profile.rows, first.n_splits, *speeds[lead.backbone], 1.0)
    calibration = float(np.median(seconds)) / predicted
    log.info("auto: probe on fold 0 (" + ctx.cfg.competition.metric + "): "
             + ", ".join(f"{s} {v:.4f}" for s, v in scores.items())
             + f"; members train with {best} ({_SYMMETRY_TEXT[best]}); an epoch takes {calibration:.2f}x the "
               "measured steps' time")
    winner = variants[best]
    return {"symmetry": best, "probe_scores": scores, "calibration": calibration,
            "member": {**winner.__dict__, "minutes": winner.minutes * calibration / planning.CALIBRATION}}


def _fold_seconds(plan: planning.Plan) -> float:
    """One fold run of the plan's first member."""
    return plan.members[0].minutes * 60 / plan.n_splits


_SYMMETRY_TEXT = {"none": "no flips", "hflip": "mirror flips", "d4": "flips and quarter turns"}


# --- task probe: classes or a number ---------------------------------------------------------------------------

MIN_INTEGER_CLASSES = 3  # from this many integer values (up to labels.MAX_CLASS_INTEGERS) a count or grade is as likely


def _integer_classes(ctx: Context, config: Path | None, overrides: list[str]) -> bool:
    """competition.task=auto read the labels as classes, and every class is an integer, 3 to 20 of them."""
    if ctx.cfg.competition.task != "single_label" or load_config(config, overrides).competition.task != "auto":
        return False
    classes = ctx.competition.classes
    return (MIN_INTEGER_CLASSES <= len(classes) <= labels.MAX_CLASS_INTEGERS
            and all(labels.is_integer(c) for c in classes))


def _active(ctx: Context, decisions: dict) -> Path:
    """The WORK the plan runs in: WORK itself, or WORK/auto/regression when the task probe chose a number."""
    return ctx.work_dir / "auto" / "regression" if decisions.get("as_number") else ctx.work_dir


def _task_probe(decisions: dict, first: planning.Plan, base: dict, data: Path, ctx: Context, submissions: Path,
                deadline: float, rt: runtime.Runtime) -> dict:
    """Integer labels: member one's fold 0 once more as a regression (in WORK/auto/regression, with its own clean
    and folds), then both runs' held-out rows scored as numbers. The regression wins only when it is better on both
    the RMSE (the classifier's probability-weighted value) and the accuracy (its rounded value against the
    classifier's top class), planning.label_as_number."""
    lead = first.members[0]
    member = planning.Member(**decisions["member"]) if decisions["member"] else planning.Member(
        planning.member_name(lead.backbone, lead.image_size, lead.seed, decisions["symmetry"]), lead.backbone,
        lead.image_size, lead.epochs, lead.seed, lead.minutes)
    cost = member.minutes * 60 / first.n_splits * (1 if decisions["member"] else 2)
    if cost > PROBE_SHARE * (deadline - time.time()):
        log.info(f"auto: integer labels read as classes; the runs to compare a regression ({cost / 60:.1f} min) "
                 f"would take over {PROBE_SHARE:.0%} of the time left (competition.task=regression decides it)")
        return {"as_number": False, "task_scores": {}}
    branch = ctx.work_dir / "auto" / "regression"
    paths = {}
    for task in ("single_label", "regression"):
        cfg = planning.plan_config(first, {**base, "competition": {**base.get("competition", {}), "task": task}})
        cfg["model"]["backbones"] = [planning.member_entry(member, decisions["symmetry"], first.weights)]
        paths[task] = ctx.work_dir / "auto" / f"{task}.yaml"
        write_text(paths[task], yaml.safe_dump(cfg, sort_keys=False))
    log.info(f"auto: integer labels ({len(ctx.competition.classes)} values): classes or a number? {member.name} "
             f"fold {PROBE_FOLD} as a regression in {branch}")
    scores = {}
    for task, work in (("single_label", ctx.work_dir), ("regression", branch)):
        pctx = orchestrate.context("train", paths[task], [f"model.only=[{member.name}]",
                                                          f"train.folds=[{PROBE_FOLD}]"],
                                   data, work, submissions, use_tuned=False)
        with time_limit(deadline - first.reserve_minutes * 60):
            try:
                orchestrate.run("train", pctx)  # the classifier's fold 0 is the probe's: up to date
            except TimeUp as exc:
                log.info(f"auto: {exc}; integer labels stay classes")
                return {"as_number": False, "task_scores": {}, "member": decisions["member"]}
        exp = pctx.selected_experiments()[0]
        values, truth = fold_values(work / "runs" / member.name / f"fold{PROBE_FOLD}",
                                    pctx.for_experiment(exp).training_data(), PROBE_FOLD, task, rt)
        lo, hi = float(truth.min()), float(truth.max())
        scores[task] = {"rmse": float(np.sqrt(np.mean((values[:, 1] - truth) ** 2))),
                        "accuracy": float(np.mean(np.clip(np.round(values[:, 0]), lo, hi) == truth))}
    cls, reg = scores["single_label"], scores["regression"]
    task = "regression" if planning.label_as_number(cls, reg, float(np.std(truth))) else "single_label"
    log.info(f"auto: on fold {PROBE_FOLD}, classes: rmse {cls['rmse']:.4f}, accuracy {cls['accuracy']:.4f}; a "
             f"number: rmse {reg['rmse']:.4f}, accuracy {reg['accuracy']:.4f}: the plan treats the label as "
             + ("a number (competition.task=regression)" if task == "regression" else "classes"))
    return {"as_number": task == "regression", "task_scores": scores, "member": member.__dict__}


# --- members ------------------------------------------------------------------------------------------------------

def _folds_done(work_dir: Path, name: str, n_splits: int) -> int:
    return sum((work_dir / "runs" / name / f"fold{k}" / "best.json").exists() for k in range(n_splits))


def _remaining(member: dict, work_dir: Path, n_splits: int) -> planning.Member:
    """A kept member with its estimated minutes cut to its folds not yet trained."""
    m = planning.Member(**member)
    left = n_splits - _folds_done(work_dir, m.name, n_splits)
    return planning.Member(m.name, m.backbone, m.image_size, m.epochs, m.seed, m.minutes * left / n_splits)


def _kept_members(members_json: Path, work_dir: Path, decisions: dict) -> list[planning.Member]:
    """The members of the plan an earlier run wrote (their runs are kept or resume), with their remaining cost."""
    planned = _read(members_json) or [decisions["member"]]
    return [_remaining(m, work_dir, decisions["n_splits"]) for m in planned]


def _write_plan(plan: planning.Plan, plan_path: Path, auto_dir: Path, base: dict, decisions: dict) -> None:
    """plan.yaml (the config) and members.json (what a rerun keeps)."""
    write_text(plan_path, _plan_yaml(plan, base, decisions))
    write_json(auto_dir / "members.json", [m.__dict__ for m in plan.members])


def _plan_yaml(plan: planning.Plan, base: dict, decisions: dict) -> str:
    head = ["# make auto's plan: a normal config (make folds train ensemble CONFIG=<this file> reproduces it).",
            f"# symmetry {plan.symmetry}: " + (", ".join(f"{s} {v:.4f}" for s, v in decisions["probe_scores"].items())
                                               + " on fold 0 (the probe)" if decisions["probe_scores"]
                                               else "the probe was skipped"),
            *([f"# the label as classes / as a number on fold {PROBE_FOLD}: " + json.dumps(decisions["task_scores"])]
              if decisions.get("task_scores") else []),
            *[f"# {n}" for n in plan.notes]]
    cfg = planning.plan_config(plan, base)
    return "\n".join(head) + "\n" + yaml.safe_dump(cfg, sort_keys=False)


def _train_members(plan: planning.Plan, plan_path: Path, data: Path, work: Path | None, submissions: Path,
                   deadline: float, started: float, budget_s: float) -> list[str]:
    """Each member in order while its estimate fits; returns the members whose folds all finished."""
    finished = []
    stop_training = deadline - plan.reserve_minutes * 60
    for i, member in enumerate(plan.members):
        left = stop_training - time.time()
        if member.minutes * 60 > left * 1.15 and i > 0:
            log.info(f"auto: {member.name} left out: its {member.minutes:.1f} min estimate exceeds the "
                     f"{max(left, 0) / 60:.1f} min left for training")
            continue
        ctx = orchestrate.context("train", plan_path, [f"model.only=[{member.name}]"], data, work, submissions,
                                  use_tuned=False)
        with time_limit(stop_training):
            try:
                orchestrate.run("train", ctx)
                finished.append(member.name)
            except TimeUp as exc:
                log.info(f"auto: {exc}; {member.name} is left out of the blend (missing folds); a rerun with a "
                         "larger budget resumes it")
        spent = time.time() - started
        log.info(f"auto: {i + 1} of {len(plan.members)} members done ({len(finished)} finished), "
                 f"{spent / 60:.1f} min spent; ETA {_eta(plan, i, spent, started, deadline)} "
                 f"(budget {budget_s / 60:.1f} min)")
    return finished


def _calibration(work: Path, plan: planning.Plan, profile: planning.Profile, speeds: dict) -> float | None:
    """Real epoch seconds over the estimate from the measured steps, median over the plan's trained folds."""
    ratios = []
    for m in plan.members:
        if m.backbone not in speeds:
            continue
        predicted = planning.epoch_seconds(profile.rows, plan.n_splits, *speeds[m.backbone], 1.0)
        for history in (work / "runs" / m.name).glob("fold*/history.csv"):
            ratios.append(float(pd.read_csv(history)["seconds"].median()) / predicted)
    return float(np.median(ratios)) if ratios else None


def _eta(plan: planning.Plan, done: int, spent: float, started: float, deadline: float) -> str:
    rest = sum(m.minutes for m in plan.members[done + 1:]) + plan.reserve_minutes
    end = min(time.time() + rest * 60, deadline)
    return f"{(end - started) / 60:.1f} min in all, at {time.strftime('%H:%M:%S', time.localtime(end))}"


def _summary(ctx: Context, started: float, budget_s: float, finished: list[str]) -> dict:
    weights = _read(ctx.work_dir / "ensemble" / "weights.json")
    wall = time.time() - started
    honest = weights.get("auto_pick_nested_score") or weights.get("honest_score")
    result = {"members": finished, "chosen": weights.get("chosen"), "honest_score": honest,
              "metric": ctx.cfg.competition.metric, "wall_seconds": round(wall, 1), "budget_seconds": budget_s,
              "submission": weights.get("submission")}
    score = f"{honest:.4f}" if isinstance(honest, float) else "n/a"
    log.info(f"auto: done in {wall / 60:.1f} min of the {budget_s / 60:.1f} min budget; honest CV "
             f"{ctx.cfg.competition.metric} {score} ({result['chosen']}); members {', '.join(finished)}")
    return result


def _write_summary(work_dir: Path, result: dict, plan_path: Path, active: Path, overrides: list[str]) -> dict:
    """WORK/auto/summary.json, with how later stages continue this run (orchestrate.later_stages): `make distill`,
    `make bundle` or `make export` with the same DATA and WORK then run on the plan, not on the defaults."""
    result = {**result, "later_stages": orchestrate.later_stages(work_dir, plan_path, active, overrides)}
    write_json(work_dir / orchestrate.AUTO_SUMMARY, result)
    elsewhere = f" in WORK {active}" if active.resolve() != work_dir.resolve() else ""
    log.info(f"auto: later stages (make distill, bundle, export, labels) with this DATA and WORK run on this plan: "
             f"{' '.join([str(plan_path), *overrides])}{elsewhere}")
    return result


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --- detection folders --------------------------------------------------------------------------------------------

def _run_detection(data: Path, config: Path | None, overrides: list[str], work: Path | None, submissions: Path,
                   budget: str | None, started: float) -> dict:
    """A detection folder: its profile, the planned detector's measured speed (and the crop classifier's), the
    detect keys planned for the budget (detection/planning.py) in WORK/plan.yaml, then the detect stage on it."""
    overrides = [*overrides, *([f"auto.budget={budget}"] if budget else [])]
    ctx = orchestrate.context("detect", config, overrides, data, work, submissions, use_tuned=False, use_plan=False)
    budget_s = duration_seconds(ctx.cfg.auto.budget)
    deadline = started + budget_s
    log.info(f"auto: detection folder; budget {budget_s / 60:.1f} min, ends by "
             f"{time.strftime('%H:%M:%S', time.localtime(deadline))}")
    runtime.set_threads(ctx.cfg.runtime.threads)
    rt = runtime.from_config(ctx.cfg.runtime, "detection")
    cfg = ctx.cfg.detect
    found = read_detection(data, cfg.data, ctx.cfg.competition, cfg.train.seed, holdout=False)
    profile = _detection_profile(found, rt.device.type)
    facts = dataclasses.asdict(profile)
    measured = _read(ctx.work_dir / "profile.json").get("speeds", {})
    size = detection_planning.image_size(profile)
    decoded = functools.cache(lambda: split_arrays(found.train, found.classes, ctx.work_dir / "cache", size, "train"))
    speeds = {backbone: _detector_speed(backbone, channels, size, found.classes, decoded, rt, measured)
              for backbone, channels in detection_planning.detectors(profile.device)}
    crop = _crop_speed(profile, rt, measured) if profile.classes >= 2 else None
    write_json(ctx.work_dir / "profile.json", {"facts": facts, "speeds": measured})
    _print_detection_profile(profile, size, speeds, crop)
    plan_path, plan_json = ctx.work_dir / "plan.yaml", ctx.work_dir / "auto" / "detect_plan.json"
    base = load_config(config, overrides).model_dump(mode="json", exclude_defaults=True)
    base.pop("auto", None)
    asked = {"facts": facts, "budget_seconds": budget_s, "config": base}
    kept = _read(plan_json)
    if {k: kept.get(k) for k in asked} == asked and plan_path.exists():
        plan = detection_planning.DetectionPlan(**kept["plan"])
        log.info(f"auto: the plan of the earlier run on this data, config and budget ({plan_path}); what it trained "
                 "is kept")
    else:
        left = deadline - time.time()
        plan = detection_planning.plan(profile, speeds, left, crop_speed=crop, reserve=ctx.cfg.auto.reserve)
        if plan.total_seconds > left:
            raise PipelineError(f"auto.budget: {budget_s / 60:.1f} min leaves {max(left, 0):.0f} s after profiling, "
                                f"and one epoch of one detector needs an estimated {plan.total_seconds:.0f} s; give a "
                                "larger BUDGET")
        planned = {**base, "detect": _merged(base.get("detect", {}), detection_planning.detect_section(plan))}
        head = [f"# make auto's plan for a detection folder: a normal config (`make detect CONFIG={plan_path}` "
                "reproduces it)", *[f"# {n}" for n in plan.notes],
                "# estimated seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in plan.seconds.items())]
        write_text(plan_path, "\n".join(head) + "\n" + yaml.safe_dump(planned, sort_keys=False))
        write_json(plan_json, {**asked, "plan": dataclasses.asdict(plan)})
    end = time.time() + plan.total_seconds - plan.seconds["reserve"]
    log.info(f"auto: plan ({plan_path}; `make detect CONFIG={plan_path}` reproduces it)\n"
             + detection_planning.table(plan) + "".join(f"\n  {n}" for n in plan.notes)
             + f"\nauto: ETA {(end - started) / 60:.1f} min in all, at {time.strftime('%H:%M:%S', time.localtime(end))}"
               f" (budget {budget_s / 60:.1f} min)")
    dctx = orchestrate.context("detect", plan_path, [], data, ctx.work_dir, submissions, use_tuned=False)
    orchestrate.run("detect", dctx)
    metrics = read_json(ctx.work_dir / "detect" / "metrics.json", "rerun `make auto`")
    wall = time.time() - started
    result = {"oof_map_50": metrics.get("oof_map_50", metrics.get("map_50")), "wall_seconds": round(wall, 1),
              "budget_seconds": budget_s, "estimated_seconds": round(plan.total_seconds, 1),
              "submission": str(dctx.submissions_dir / f"{dctx.name}.csv"), "plan": str(plan_path)}
    _write_summary(ctx.work_dir, result, plan_path, ctx.work_dir, [])
    log.info(f"auto: done in {wall / 60:.1f} min of the {budget_s / 60:.1f} min budget; "
             f"{'OOF' if plan.n_splits > 1 else 'validation'} mAP@0.5 {result['oof_map_50']:.4f}")
    return result


def _detection_profile(found: DetectionData, device: str) -> detection_planning.DetectionProfile:
    """The training images' count and longer sides, their boxes' sides as a share of the image's (sqrt of the area
    shares: what a square resize keeps), the classes and the other splits' sizes."""
    images, boxes = found.train.images, found.train.boxes
    width = images["width"].to_numpy(float)[boxes["item"].to_numpy(int)]
    height = images["height"].to_numpy(float)[boxes["item"].to_numpy(int)]
    area = (boxes["xmax"] - boxes["xmin"]).to_numpy(float) * (boxes["ymax"] - boxes["ymin"]).to_numpy(float)
    share = np.sqrt(area / (width * height))
    share = share[np.isfinite(share) & (share > 0)]
    return detection_planning.DetectionProfile(
        images=len(images), val_images=len(found.val.images), test_images=len(found.test.images),
        classes=len(found.classes), boxes=len(share),
        image_side=int(np.median(np.maximum(images["width"], images["height"]))),
        box_p10=float(np.percentile(share, 10)), box_median=float(np.median(share)), device=device)


def _detector_speed(backbone: str, channels: int, size: int, classes: list[str], decoded: Callable[[], Arrays],
                    rt: runtime.Runtime, measured: dict) -> tuple[float, float]:
    """(training, validation) seconds per image of FCOS on `backbone` at `size`, measured once per machine setting
    on the training images decoded at that size (`decoded`: once, into the cache the detect stage then reads)."""
    batch = detection_planning.BATCH_SIZE
    key = (f"fcos-{backbone}-fpn{channels}@{size}px/b{batch}/{len(classes)}cls/{rt.device.type}/"
           f"{torch.get_num_threads()}t")
    if key not in measured:
        t0 = time.perf_counter()
        arrays = decoded()
        torch.manual_seed(0)
        model = rt.prepare(create("fcos", len(classes), size, backbone, channels))
        train, validate = detection_speed.measure(model, arrays.images, arrays.targets, arrays.sizes, batch, 0.01, rt)
        measured[key] = {"train": train, "validate": validate}
        log.info(f"auto: measured fcos on {backbone} at {size} px: {1 / train:.0f} training and {1 / validate:.0f} "
                 f"validated images/s ({time.perf_counter() - t0:.1f} s)")
    return measured[key]["train"], measured[key]["validate"]


def _crop_speed(profile: detection_planning.DetectionProfile, rt: runtime.Runtime,
                measured: dict) -> tuple[float, float]:
    """(training, prediction) seconds per crop of the crop classifier at its planned size (training/speed.py)."""
    backbone, batch = detection_planning.CROP_BACKBONE, detection_planning.CROP_BATCH
    size = detection_planning.CROP_SIZE.get(profile.device, detection_planning.CROP_SIZE["cpu"])
    key = f"crops-{backbone}@{size}px/b{batch}/{profile.classes}cls/{rt.device.type}/{torch.get_num_threads()}t"
    if key not in measured:
        t0 = time.perf_counter()
        s = speed.measure(backbone, size, 3, profile.classes, batch, rt)
        measured[key] = {"train": s.train, "predict": s.predict}
        log.info(f"auto: measured the crop classifier {backbone} at {size} px: {1 / s.train:.0f} training and "
                 f"{1 / s.predict:.0f} predicted crops/s ({time.perf_counter() - t0:.1f} s)")
    return measured[key]["train"], measured[key]["predict"]


def _print_detection_profile(profile: detection_planning.DetectionProfile, size: int, speeds: dict,
                             crop: tuple[float, float] | None) -> None:
    lines = [f"  images: {profile.images} train ({profile.boxes} boxes, {profile.boxes_per_image:.1f} per image), "
             f"{profile.val_images} val, {profile.test_images} test; {profile.classes} classes",
             f"  longer side median {profile.image_side} px; box side / image side: 10th percentile "
             f"{profile.box_p10:.3f}, median {profile.box_median:.3f}; planned size {size} px",
             f"  speed on {profile.device} ({torch.get_num_threads()} threads), images/s training | validating:"]
    lines += [f"    fcos {b:<16} {1 / t:>8.1f} | {1 / v:.1f}" for b, (t, v) in speeds.items()]
    if crop:
        lines.append(f"    crops {detection_planning.CROP_BACKBONE:<15} {1 / crop[0]:>8.1f} | {1 / crop[1]:.1f}")
    log.info("auto: profile (detection folder)\n" + "\n".join(lines))


def _merged(base: dict, planned: dict) -> dict:
    """`base` with `planned`'s keys put in, section by section (the plan's keys win)."""
    out = dict(base)
    for key, value in planned.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --- segmentation folders -----------------------------------------------------------------------------------------

SPEED_IMAGES = 64  # training images decoded at each candidate size for the timed steps (cycled when fewer)


def _run_segmentation(data: Path, config: Path | None, overrides: list[str], work: Path | None, submissions: Path,
                      budget: str | None, started: float) -> dict:
    """A segmentation folder: its profile, the default member's measured speed at candidate sizes, the segment keys
    planned for the budget (segmentation/planning.py) in WORK/plan.yaml, then the segment stage on it."""
    overrides = [*overrides, *([f"auto.budget={budget}"] if budget else [])]
    ctx = orchestrate.context("segment", config, overrides, data, work, submissions, use_tuned=False, use_plan=False)
    budget_s = duration_seconds(ctx.cfg.auto.budget)
    deadline = started + budget_s
    log.info(f"auto: segmentation folder; budget {budget_s / 60:.1f} min, ends by "
             f"{time.strftime('%H:%M:%S', time.localtime(deadline))}")
    orchestrate.run("clean", ctx)  # first: the profile and the timed steps read only images it could decode
    runtime.set_threads(ctx.cfg.runtime.threads)
    rt = runtime.from_config(ctx.cfg.runtime, "segmentation")
    cfg = ctx.cfg.segment
    found = segment_stage.readable(segment_stage.read_data(ctx), clean_csv(ctx.work_dir))
    profile = _segmentation_profile(found, rt.device.type)
    facts = dataclasses.asdict(profile)
    measured = _read(ctx.work_dir / "profile.json").get("speeds", {})
    member = cfg.models[0]
    sizes = segmentation_planning.candidate_sizes(profile.image_side)
    threads = ctx.cfg.runtime.threads or _segmentation_threads(member, sizes[-1], found, cfg.train,
                                                               ctx.work_dir / "cache", rt, measured)
    if threads != torch.get_num_threads():  # the plan and the segment stage train with the faster setting
        runtime.set_threads(threads)
        overrides = [*overrides, f"runtime.threads={threads}"]
    speeds = {size: _segmenter_speed(member, size, found, cfg.train, ctx.work_dir / "cache", rt, measured)
              for size in sizes}
    write_json(ctx.work_dir / "profile.json", {"facts": facts, "speeds": measured})
    _print_segmentation_profile(profile, member.label, speeds)
    plan_path, plan_json = ctx.work_dir / "plan.yaml", ctx.work_dir / "auto" / "segment_plan.json"
    base = load_config(config, overrides).model_dump(mode="json", exclude_defaults=True)
    base.pop("auto", None)
    asked = {"facts": facts, "budget_seconds": budget_s, "config": base}
    kept = _read(plan_json)
    if {k: kept.get(k) for k in asked} == asked and plan_path.exists():
        plan = segmentation_planning.SegmentationPlan(**kept["plan"])
        log.info(f"auto: the plan of the earlier run on this data, config and budget ({plan_path}); what it trained "
                 "is kept")
    else:
        left = deadline - time.time()
        plan = segmentation_planning.plan(profile, speeds, left, reserve=ctx.cfg.auto.reserve)
        if plan.total_seconds > left:
            raise PipelineError(f"auto.budget: {budget_s / 60:.1f} min leaves {max(left, 0):.0f} s after profiling, "
                                f"and one epoch on {plan.n_splits} folds needs an estimated {plan.total_seconds:.0f} "
                                "s; give a larger BUDGET")
        planned = {**base, "segment": _merged(base.get("segment", {}), segmentation_planning.segment_section(plan))}
        per_size = ", ".join(f"{s} px {t:.4f} | {v:.4f}" for s, (t, v) in speeds.items())
        head = [f"# make auto's plan for a segmentation folder: a normal config (`make segment CONFIG={plan_path}` "
                "reproduces it)", *[f"# {n}" for n in plan.notes],
                f"# measured seconds per image of {member.label} (training | validation) on {profile.device}, "
                f"{torch.get_num_threads()} threads: {per_size}",
                "# estimated seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in plan.seconds.items())
                + f"; ETA {plan.total_seconds - plan.seconds['reserve']:.0f} s of the {left:.0f} s left"]
        write_text(plan_path, "\n".join(head) + "\n" + yaml.safe_dump(planned, sort_keys=False))
        write_json(plan_json, {**asked, "plan": dataclasses.asdict(plan)})
    end = time.time() + plan.total_seconds - plan.seconds["reserve"]
    log.info(f"auto: plan ({plan_path}; `make segment CONFIG={plan_path}` reproduces it)\n"
             + segmentation_planning.table(plan) + "".join(f"\n  {n}" for n in plan.notes)
             + f"\nauto: ETA {(end - started) / 60:.1f} min in all, at {time.strftime('%H:%M:%S', time.localtime(end))}"
               f" (budget {budget_s / 60:.1f} min)")
    sctx = orchestrate.context("segment", plan_path, [], data, ctx.work_dir, submissions, use_tuned=False)
    metrics = orchestrate.run("segment", sctx)
    wall = time.time() - started
    result = {"nested_dice": metrics["nested_dice"], "oof_dice_chosen": metrics["oof_dice_chosen"],
              "wall_seconds": round(wall, 1), "budget_seconds": budget_s,
              "estimated_seconds": round(plan.total_seconds, 1),
              "submission": str(sctx.submissions_dir / f"{sctx.name}.csv"), "plan": str(plan_path)}
    _write_summary(ctx.work_dir, result, plan_path, ctx.work_dir, [])
    log.info(f"auto: done in {wall / 60:.1f} min of the {budget_s / 60:.1f} min budget; OOF Dice nested (honest) "
             f"{result['nested_dice']:.4f}")
    return result


def _sample(n: int, k: int) -> list[int]:
    """k of n rows, the same ones on every run."""
    return sorted(np.random.default_rng(0).choice(n, min(k, n), replace=False).tolist())


def _segmentation_profile(found: SegmentationData, device: str) -> segmentation_planning.SegmentationProfile:
    """The training images' count and median longer side, the classes, the test images, and the share of training
    images with no mask pixel (read on a sample of SIDE_SAMPLE: a mask decode costs more than a header)."""
    train = found.train
    empty = [not found.masks(i).any() for i in _sample(len(train), SIDE_SAMPLE)]
    return segmentation_planning.SegmentationProfile(
        images=len(train), test_images=len(found.test), classes=len(found.classes),
        image_side=int(np.median(np.maximum(train.heights, train.widths))),
        empty_share=round(float(np.mean(empty)), 4), device=device)


def _segmenter_speed(member: SegmentMemberConfig, size: int, found: SegmentationData, train: SegmentTrainConfig,
                     cache: Path, rt: runtime.Runtime, measured: dict) -> tuple[float, float]:
    """(training, validation) seconds per image of `member` at `size`, measured once per machine setting on
    SPEED_IMAGES real training images and their masks resized to that size."""
    key = (f"{member.arch}-{member.encoder}@{size}px/b{train.batch_size}/{len(found.classes)}cls/{train.loss}/"
           f"{rt.device.type}/{torch.get_num_threads()}t")
    if key not in measured:
        t0 = time.perf_counter()
        rows = _sample(len(found.train), SPEED_IMAGES)
        paths = [found.train.paths[i] for i in rows]
        images = cached_decode(cache, content_key(paths), paths, size, 3, "segment-speed")
        masks = np.stack([np.stack([resize_mask(m, size) for m in found.masks(i)]) for i in rows])
        torch.manual_seed(0)
        # random weights: the speed does not depend on them, and timing must not download any
        model = rt.prepare(segmentation_models.create(member.arch, member.encoder, len(found.classes)))
        t, v = segmentation_speed.measure(model, images, masks, train.batch_size, train.lr, train.loss, rt)
        measured[key] = {"train": t, "validate": v}
        log.info(f"auto: measured {member.label} at {size} px: {1 / t:.1f} training and {1 / v:.1f} validated "
                 f"images/s ({time.perf_counter() - t0:.1f} s)")
    return measured[key]["train"], measured[key]["validate"]


def _segmentation_threads(member: SegmentMemberConfig, size: int, found: SegmentationData, train: SegmentTrainConfig,
                          cache: Path, rt: runtime.Runtime, measured: dict) -> int:
    """On the CPU, torch's default threads or one thread, whichever trains `member` faster at `size` (the smallest
    candidate: the cheapest to time) here; as _fastest_threads, because beside other busy processes one thread can
    be several times faster."""
    default = torch.get_num_threads()
    if rt.device.type != "cpu" or default == 1:
        return default
    seconds = {}
    for n in (default, 1):
        torch.set_num_threads(n)
        seconds[n] = _segmenter_speed(member, size, found, train, cache, rt, measured)[0]
    torch.set_num_threads(default)
    best = min(seconds, key=seconds.get)
    if best != default:
        log.info(f"auto: one CPU thread trains {seconds[default] / seconds[1]:.1f}x faster than {default} here (other "
                 "processes share the cores): the plan sets runtime.threads=1")
    return best


def _print_segmentation_profile(profile: segmentation_planning.SegmentationProfile, label: str,
                                speeds: dict[int, tuple[float, float]]) -> None:
    lines = [f"  images: {profile.images} train, {profile.test_images} test; {profile.classes} classes; "
             f"{profile.empty_share:.0%} of training images without a mask",
             f"  longer side median {profile.image_side} px",
             f"  speed of {label} on {profile.device} ({torch.get_num_threads()} threads), images/s training | "
             "validating:"]
    lines += [f"    {size:>4} px {1 / t:>8.1f} | {1 / v:.1f}" for size, (t, v) in speeds.items()]
    log.info("auto: profile (segmentation folder)\n" + "\n".join(lines))
