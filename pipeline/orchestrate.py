"""Which stages run before a stage, and with which config: the one place that chains stages.

Stage modules do their own work only. `run` first runs a stage's upstream stages (clean -> folds -> train ->
predict -> rounds -> ensemble -> labels; bundle and distill follow ensemble, export train; tune and autogluon need
folds; segment follows clean, whose duplicate groups its folds keep together, and on a segmentation folder clean is
stages/clean_segmentation.py; detect stands alone, and bundle and export follow detect on a detection folder); they
skip when their outputs are complete and match, so any stage can be asked for directly and an interrupted chain
resumes.
Before any of them runs, every stage of the chain checks what it can tell from the config and the task alone
(`check`): a stage that cannot do this task refuses before the stages above it spend their time. `context` builds
the stage's Context and merges the tuned parameters of WORK/tune/best.yaml unless told not to. Stages that write
files shared by the whole WORK run under a lock file (WORK/locks/<stage>.lock, core/locks.py), so several processes
on one WORK take turns. Under torchrun the upstream
stages run on rank 0 while the other ranks wait. `python -m pipeline STAGE` (cli.py) is a thin wrapper over these two.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from pipeline.context import Context
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.locks import Lock
from pipeline.detection.data import is_detection_folder
from pipeline.segmentation.data import is_segmentation_folder
from pipeline.stages import (
    autogluon,
    bundle,
    clean,
    clean_segmentation,
    detect,
    distill,
    ensemble,
    export,
    folds,
    predict,
    rounds,
    segment,
    train,
    tune,
)
from pipeline.stages import label_issues as labels
from pipeline.training import distributed

log = logging.getLogger(__name__)

STAGES: dict[str, Callable[[Context], object]] = {
    "clean": clean.run, "folds": folds.run, "train": train.run, "predict": predict.run, "rounds": rounds.run,
    "ensemble": ensemble.run, "labels": labels.run,
    "tune": tune.run, "autogluon": autogluon.run, "detect": detect.run, "segment": segment.run,
    "bundle": bundle.run, "export": export.run,
    "distill": distill.run}
UPSTREAM = {"clean": (), "folds": ("clean",), "train": ("folds",), "predict": ("train",), "rounds": ("predict",),
            "ensemble": ("rounds",), "labels": ("ensemble",),
            "tune": ("folds",), "autogluon": ("folds",), "detect": (), "segment": ("clean",), "bundle": ("ensemble",),
            "export": ("train",),
            "distill": ("ensemble",)}
# stages that write files shared by the whole WORK (clean.csv, folds.csv, the ensemble, the submission): one process
# at a time (WORK/locks/<stage>.lock)
SHARED_WRITERS = {"clean", "folds", "ensemble", "labels", "autogluon", "detect", "segment", "bundle", "export",
                  "distill"}
# refusals that need no work, only the config and the task (read from the CSVs by Context)
CHECKS: dict[str, Callable[[Context], None]] = {
    "clean": clean.check, "train": train.check, "rounds": rounds.check, "labels": labels.check, "tune": tune.check,
    "autogluon": autogluon.check, "distill": distill.check}


# a detection folder's stages: its bundle packs what detect wrote, its export one of detect's fold models
DETECTION_UPSTREAM = {**UPSTREAM, "bundle": ("detect",), "export": ("detect",)}
# a segmentation folder's clean reads masks, not labels
SEGMENTATION_STAGES = {**STAGES, "clean": clean_segmentation.run}
SEGMENTATION_CHECKS = {**CHECKS, "clean": clean_segmentation.check}


def chain(stage: str, detection: bool = False) -> list[str]:
    """The stages to run for `stage`, upstream first, each once (`detection`: on a detection folder)."""
    upstream = DETECTION_UPSTREAM if detection else UPSTREAM
    order: list[str] = []
    for before in upstream[stage]:
        order += [s for s in chain(before, detection) if s not in order]
    return order + [stage]


def _detection(stage: str, ctx_or_cfg, data: Path) -> bool:
    """Whether `stage` runs on a detection folder as the detection track's (only bundle and export tell the two
    apart)."""
    return stage in ("bundle", "export") and is_detection_folder(data, ctx_or_cfg.detect.data.train_csv)


def _segmentation(stage: str, ctx_or_cfg, data: Path) -> bool:
    """Whether `stage` runs on a segmentation folder: segment always (its clean is the segmentation clean), clean
    when the folder holds masks (segment.data names its files)."""
    if stage == "segment":
        return True
    return stage == "clean" and _holds_masks(ctx_or_cfg, data)


def _holds_masks(cfg, data: Path) -> bool:
    files = cfg.segment.data
    return is_segmentation_folder(data, files.train_csv, files.test_csv, files.masks_dir)


def context(stage: str, config: Path | None, overrides: list[str], data: Path, work: Path | None = None,
            submissions: Path = Path("submissions"), use_tuned: bool = True, use_plan: bool = True) -> Context:
    """The resolved config and folders of a stage run; WORK/tune/best.yaml is merged in (not for tune itself). With
    no config, a WORK where `make auto` finished (auto_plan) runs on its plan, members and WORK: `make distill` or
    `make bundle` after `make auto` continue its run instead of training the defaults' portfolio from scratch."""
    cfg = load_config(config, overrides)
    if config is None and use_plan:
        planned = auto_plan(Context(cfg, data, work, submissions, resolve=False).work_dir)
        if planned is not None:
            config, extra, work = planned
            overrides = [*extra, *overrides]
            log.info(f"config: {config} {' '.join(extra)}, the plan `make auto` ran in this WORK (CONFIG=... runs "
                     "another config)")
            cfg = load_config(config, overrides)
    if stage not in ("clean", "detect", "segment") and _holds_masks(cfg, data):
        raise PipelineError(f"{data}: its train.csv holds masks, and `{stage}` belongs to the classification track; "
                            f"run `make segment DATA={data}` (or `make auto DATA={data}`)")
    # the detection and segmentation tracks have no competition.task or metric to decide
    resolve = stage not in ("detect", "segment") and not _detection(stage, cfg, data) \
        and not _segmentation(stage, cfg, data)
    ctx = Context(cfg, data, work, submissions, resolve=resolve)
    tuned = ctx.work_dir / "tune" / "best.yaml"
    if stage != "tune" and use_tuned and tuned.exists():
        log.info(f"config: using tuned parameters from {tuned} (USE_TUNED=0 ignores them)")
        ctx = Context(load_config(config, overrides, tuned=tuned), data, work, submissions, resolve=resolve)
    return ctx


AUTO_SUMMARY = Path("auto") / "summary.json"  # make auto's last word on a WORK, under it


def later_stages(work_dir: Path, plan: Path, active: Path, overrides: list[str]) -> dict:
    """How the stages after `make auto` continue its run (WORK/auto/summary.json's `later_stages`): the plan, the
    overrides the run itself used (the members that finished) and the WORK it ran in, the paths relative to WORK."""
    return {"config": os.path.relpath(plan, work_dir), "overrides": list(overrides),
            "work": os.path.relpath(active, work_dir)}


def auto_plan(work_dir: Path) -> tuple[Path, list[str], Path] | None:
    """(config, overrides, WORK) of make auto's finished run in `work_dir` (later_stages), or None."""
    try:
        later = json.loads((work_dir / AUTO_SUMMARY).read_text())["later_stages"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    config = work_dir / later["config"]
    return (config, list(later["overrides"]), work_dir / later["work"]) if config.is_file() else None


def run(stage: str, ctx: Context):
    """Run `stage` after its upstream stages; returns the stage's own result."""
    stages = chain(stage, _detection(stage, ctx.cfg, ctx.data_dir))
    segmentation = _segmentation(stage, ctx.cfg, ctx.data_dir)
    table, checks = (SEGMENTATION_STAGES, SEGMENTATION_CHECKS) if segmentation else (STAGES, CHECKS)
    for name in stages:  # on every rank: each refuses alike, none waits at a barrier for the others
        if name in checks:
            checks[name](ctx)
    distributed.setup()  # under torchrun: join the group first, so only rank 0 runs the upstream stages
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes
        ctx.save_config()
    if distributed.is_main():
        for before in stages[:-1]:
            _locked(before, ctx, table)
    distributed.barrier()
    if distributed.is_main():
        return _locked(stage, ctx, table)
    return table[stage](ctx)


def _locked(name: str, ctx: Context, table: dict[str, Callable[[Context], object]] = STAGES):
    """Run stage `name`, under WORK/locks/<name>.lock when it writes files shared by the whole WORK: a second
    process waits (one line says for whom), then finds the stage's stamp up to date and skips. train, predict and
    rounds lock each run instead (training/schedule.py); tune's workers share their Optuna study by design."""
    if name not in SHARED_WRITERS:
        return table[name](ctx)
    with Lock(ctx.lock_path(name), name, log.info):
        return table[name](ctx)
