"""`python -m pipeline STAGE`: a thin wrapper over pipeline/orchestrate.py, plus data and scoring commands.

A stage runs after its upstream stages (orchestrate.chain); they skip when their outputs are
complete, so any stage can be asked for directly and an interrupted chain resumes. User-fixable
problems end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
import tempfile
from pathlib import Path

from pipeline import auto, orchestrate
from pipeline.context import Context
from pipeline.core import log
from pipeline.core.config import defaults_yaml, load_config, to_yaml
from pipeline.core.errors import PipelineError
from pipeline.core.registry import METRICS
from pipeline.data import digits
from pipeline.detection.bananas import build_bananas
from pipeline.detection.data import is_detection_folder
from pipeline.detection.infer import score_submission
from pipeline.detection.shapes import KINDS, build_shapes
from pipeline.scoring import submission
from pipeline.segmentation import generate as segmentation_generate
from pipeline.segmentation.data import is_segmentation_folder
from pipeline.segmentation.submit import score_masks, validate_segmentation
from pipeline.stages.segment import read_data as read_segmentation_data


def _output_options() -> argparse.ArgumentParser:
    """--quiet / --verbose, accepted after every command."""
    common = argparse.ArgumentParser(add_help=False)
    loudness = common.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only")
    loudness.add_argument("-v", "--verbose", action="store_true", help="also print debug messages, with their module")
    return common


def _stage_parser(sub, name: str, help_text: str, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(name, help=help_text, parents=[common])
    p.add_argument("--data", type=Path, default=Path("data/digits"),
                   help="competition folder (train.csv, test.csv, images)")
    p.add_argument("--config", type=Path, default=None, help="experiment YAML (differences from configs/default.yaml)")
    p.add_argument("--work", type=Path, default=None, help="artifact folder (default work/<competition>)")
    p.add_argument("--submissions", type=Path, default=Path("submissions"), help="where submission CSVs go")
    p.add_argument("--no-tuned", action="store_true", help="ignore WORK/tune/best.yaml (make USE_TUNED=0)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 model.backbones=[resnet18]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = _output_options()
    for name, fn in orchestrate.STAGES.items():
        _stage_parser(sub, name, (fn.__module__.rsplit(".", 1)[-1] + " stage"), common)
    _stage_parser(sub, "auto", "profile, plan for a time budget and run the whole chain (pipeline/auto.py)", common)
    sub.choices["auto"].add_argument("--budget", default=None,
                                     help="wall time of the whole chain: 90s, 25m, 2h (default: auto.budget)")
    p = sub.add_parser("make-digits", parents=[common],
                       help="build the embedded default competition from scikit-learn's digits")
    p.add_argument("--out", type=Path, default=Path("data/digits"))
    p.add_argument("--limit", type=int, default=None, help="keep a stratified subset of this many images")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("make-bananas", parents=[common],
                       help="build the embedded detection competition (banana-style, 256x256)")
    p.add_argument("--out", type=Path, default=Path("data/bananas"))
    p.add_argument("--train", type=int, default=1000, help="training images (d2l: 1000)")
    p.add_argument("--val", type=int, default=100, help="validation images (d2l: 100)")
    p.add_argument("--test", type=int, default=100, help="test images (hidden boxes in test_solution.csv)")
    p.add_argument("--max-rotation", type=float, default=20.0,
                   help="bananas turn by up to this many degrees either way")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("make-objects", parents=[common],
                       help="build a multi-object detection competition: 128x128 textured scenes, 1-4 objects "
                            "of 10 classes (shapes, or look-alike handwritten digits)")
    p.add_argument("--out", type=Path, default=Path("data/objects"))
    p.add_argument("--kind", choices=KINDS, default="digits")
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--test", type=int, default=300, help="test images (hidden boxes in test_solution.csv)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("make-masks", parents=[common],
                       help="build a segmentation competition: 128x128 gray scenes, 0-3 soft-edged objects of 3 "
                            "classes, masks as RLE (wide form; hidden test masks beside the folder)")
    p.add_argument("--out", type=Path, default=Path("data/masks"))
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--test", type=int, default=100, help="test images (hidden masks in <out>_solution.csv)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("score-detection", parents=[common],
                       help="mAP of a detection submission against a hidden solution file")
    p.add_argument("submission", type=Path)
    p.add_argument("solution", type=Path)
    p = sub.add_parser("score-masks", parents=[common],
                       help="mean Dice of a segmentation submission against a hidden solution file (any mask form)")
    p.add_argument("submission", type=Path)
    p.add_argument("solution", type=Path)
    p.add_argument("--data", type=Path, default=Path("data/masks"),
                   help="the competition folder (the test images' sizes, the classes and the id column)")
    p.add_argument("--config", type=Path, default=None)
    p = sub.add_parser("score", parents=[common],
                       help="score a label submission against a hidden solution file")
    p.add_argument("submission", type=Path)
    p.add_argument("solution", type=Path)
    p.add_argument("--metric", default="accuracy", choices=list(METRICS))
    p = sub.add_parser("validate-submission", parents=[common],
                       help="check a submission file against a competition folder")
    p.add_argument("file", type=Path)
    p.add_argument("--data", type=Path, default=Path("data/digits"))
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--track", choices=("classification", "segmentation"), default="classification",
                   help="segmentation: RLE masks in the sample submission's form (segment.data names the CSVs)")
    p = sub.add_parser("config", parents=[common],
                       help="print the resolved config (or the documented defaults)")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--defaults", action="store_true", help="print configs/default.yaml")
    p.add_argument("overrides", nargs="*")
    return parser


WRITES_SUBMISSIONS = {"ensemble", "labels", "detect", "segment", "bundle"}  # labels and bundle run ensemble first
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def writable_folder(path: Path, name: str, option: str) -> None:
    """Create the folder and write a probe file in it, so that a folder which cannot take a stage's outputs (a file in
    its place or above it, no permission, a read-only or full disk) is one line before any work, not a traceback
    after."""
    fix = f"pass another {option} (make {name}=...)"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise PipelineError(f"{name} folder {path}: is a file, not a folder; {fix}") from None
    except NotADirectoryError:
        above = next((p for p in path.parents if p.is_file()), path.parent)
        raise PipelineError(f"{name} folder {path}: lies below the file {above}; {fix}") from None
    except PermissionError:
        raise PipelineError(f"{name} folder {path}: not writable (permission denied); "
                            f"fix its permissions or {fix}") from None
    except OSError as exc:
        raise PipelineError(f"{name} folder {path}: cannot be written ({exc.strerror}); {fix}") from None


def check_folders(ctx: Context, command: str) -> None:
    writable_folder(ctx.work_dir, "WORK", "--work")
    if command in WRITES_SUBMISSIONS:
        writable_folder(ctx.submissions_dir, "SUBMISSIONS", "--submissions")


@contextlib.contextmanager
def disk_errors(ctx: Context):
    """The disk filled up (or went read-only) during a stage: one line; atomic writes left no partial file behind."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        where = exc.filename or f"under WORK {ctx.work_dir} or SUBMISSIONS {ctx.submissions_dir}"
        raise PipelineError(f"{exc.strerror} writing {where}; free disk space or pass another --work/--submissions, "
                            "then run the same command again (finished stages are kept)") from None


def dispatch(args: argparse.Namespace) -> None:
    if args.command in orchestrate.STAGES:
        ctx = orchestrate.context(args.command, args.config, args.overrides, args.data, args.work, args.submissions,
                                  use_tuned=not args.no_tuned)
        check_folders(ctx, args.command)
        with disk_errors(ctx):
            orchestrate.run(args.command, ctx)
    elif args.command == "auto":
        budget = [f"auto.budget={args.budget}"] if args.budget else []
        # a detection or segmentation folder has no task to decide: its own track's context
        first = ("detect" if is_detection_folder(args.data)
                 else "segment" if is_segmentation_folder(args.data) else "clean")
        ctx = orchestrate.context(first, args.config, [*args.overrides, *budget], args.data, args.work,
                                  args.submissions, use_tuned=False, use_plan=False)
        check_folders(ctx, "ensemble")
        with disk_errors(ctx):
            auto.run(args.data, args.config, args.overrides, args.work, args.submissions, args.budget)
    elif args.command == "make-digits":
        out = digits.build_digits(args.out, seed=args.seed, limit=args.limit)
        print(f"digits: competition written to {out}, hidden solution to {digits.solution_path(out)}")
    elif args.command == "make-bananas":
        out = build_bananas(args.out, args.train, args.val, args.test, seed=args.seed, max_rotation=args.max_rotation)
        print(f"bananas: detection competition written to {out} "
              f"({args.train} train, {args.val} val, {args.test} test images)")
    elif args.command == "make-objects":
        out = build_shapes(args.out, args.train, args.val, args.test, seed=args.seed, kind=args.kind)
        print(f"objects: {args.kind} detection competition written to {out} "
              f"({args.train} train, {args.val} val, {args.test} test images; hidden boxes in test_solution.csv)")
    elif args.command == "make-masks":
        out = segmentation_generate.build_masks(args.out, args.train, args.test, seed=args.seed)
        print(f"masks: segmentation competition written to {out} ({args.train} train, {args.test} test images; "
              f"hidden masks in {segmentation_generate.solution_path(out)})")
    elif args.command == "score-detection":
        maps = score_submission(args.submission, args.solution)
        print(f"score: {args.submission} on the hidden solution: mAP@0.5 {maps['map_50']:.4f}, "
              f"COCO mAP {maps['map']:.4f}")
    elif args.command == "score-masks":
        data = read_segmentation_data(Context(load_config(args.config), args.data, resolve=False))
        scores = score_masks(submission.read_submission(args.submission),
                             submission.read_submission(args.solution, "solution"), data,
                             (str(args.submission), str(args.solution)))
        per_class = ", ".join(f"{c} {v:.4f}" for c, v in scores["per_class"].items())
        print(f"score: mean Dice of {args.submission} on the hidden solution: {scores['dice']:.4f} ({per_class})")
    elif args.command == "score":
        value = submission.score_file(args.submission, args.solution, args.metric)
        print(f"score: {args.metric} of {args.submission} on the hidden solution: {value:.4f}")
    elif args.command == "validate-submission" and args.track == "segmentation":
        ctx = Context(load_config(args.config), args.data, resolve=False)
        frame = submission.read_submission(args.file)
        validate_segmentation(frame, str(args.file), read_segmentation_data(ctx))
        print(f"{args.file}: valid segmentation submission for {ctx.name} ({len(frame)} rows)")
    elif args.command == "validate-submission":
        ctx = Context(load_config(args.config), args.data)
        frame = submission.read_submission(args.file)
        submission.validate(frame, ctx.competition, str(args.file))
        print(f"{args.file}: valid submission for {ctx.name} ({len(frame)} rows)")
    elif args.command == "config":
        print(defaults_yaml() if args.defaults else to_yaml(load_config(args.config, args.overrides)), end="")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.setup(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    try:
        dispatch(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
