"""Clean stage: unreadable and flat images, exact and near duplicates, label conflicts.

Every image (train and test) is decoded once in worker processes (pipeline/data/dedup.py computes its
fingerprints and pairs, pipeline/data/quality.py decides what is dropped and builds the tables; this module
reads the inputs, calls them and writes the artifacts). Undecodable training images are dropped with the
reason; an undecodable test image is an error, since the submission needs a prediction for it. Single-colour
("flat") images are kept and reported with their labels (an empty canvas is a label in counting, detection and
segmentation competitions), dropped only under clean.drop_flat, and never paired. Exact and near duplicates
(perceptual hashes confirmed in pixel space; images below clean.near_min_size or mostly one value, in pixel
space) become groups (connected components of the pairs; with clean.embeddings, also pairs of similar backbone
embeddings, pipeline/training/embeddings.py), unless there are more such pairs than images (then only exact
copies are acted on, with a warning); groups whose training labels disagree are dropped or resolved by
majority; one copy of each pixel-identical training group is kept. The raw folder is never
touched. Writes clean.csv (kept rows with their group), duplicates.csv (every pair, with its kind: exact,
near, small, sparse or embedding, and an embedding pair's cosine similarity), dropped.csv (id, reason),
report/clean.html, optionally test_label_overrides.csv, and the stamp clean.json. With clean.label_issues=drop
or relabel, reads WORK/label_issues.csv, written by the labels stage (pipeline/stages/label_issues.py).

Extra data (`competition.extra`): the rows of more labelled folders are decoded, hashed and grouped
with the competition's rows, then screened so that they can only ever add training rows. An extra
image grouped (exact or near) with a test image is a leak: reported, and dropped unless
`clean.keep_extra_leaks=true`. One grouped with a competition training image is dropped as its
duplicate, whatever its label, and the training row stays: a copy in the training set of a
validation image would leak that image's label into its fold, and extra rows never change which
competition rows are kept, so the folds and every CV score stay comparable with and without extra
data. Among themselves, extra rows follow the conflict and exact-duplicate rules of training rows.
Kept extra rows go to clean.csv with their `source` (the folder as configured; empty for the
competition's own rows); the folds stage gives them fold -1 (pipeline/stages/folds.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from pipeline.context import Context
from pipeline.core import experiments
from pipeline.core.artifacts import (
    content_key,
    file_digest,
    fingerprint,
    is_done,
    read_stamp,
    write_csv,
    write_json,
    write_stamp,
)
from pipeline.core.errors import PipelineError
from pipeline.data import dedup, quality, report
from pipeline.data.competition import read_extra
from pipeline.scoring.label_issues import label_issues_csv
from pipeline.training import embeddings, runtime

log = logging.getLogger(__name__)

DROPPED_COLUMNS = ["id", "split", "label", "reason", "source"]  # source: the extra folder; empty for the competition's

# the competition keys clean reads (metric, channels, name and sample_submission_csv do not change its outputs)
READS = {"train_csv", "test_csv", "id_column", "label_column", "group_column", "image_dir", "image_suffix", "extra",
         "task", "label_separator"}


# the settings that decide the pairs of each kind (named when a flood of pairs is set aside)
SETTING_OF_KIND = {"near": ["clean.near_threshold", "clean.near_confirm"], "small": ["clean.small_threshold"],
                   "sparse": ["clean.small_threshold"], "embedding": ["clean.embedding_threshold"]}

EMBEDDING_KEYS = {"embedding_threshold", "embedding_backbone", "embedding_image_size"}  # read only when embeddings


def _inputs_fingerprint(ctx: Context, extra: pd.DataFrame, source: embeddings.Source | None = None) -> str:
    """What clean reads: the CSVs, the bytes of every train, extra and test image (test images are checked for
    readability and duplicates of training images), how the CSVs are read, and the clean keys but `workers`;
    with clean.embeddings, the weights that embed (their bytes, backbone, size, channels, normalisation)."""
    comp, ccfg = ctx.competition, ctx.cfg.competition
    images = content_key(pd.concat([comp.train.path, extra.path, comp.test.path]))
    csvs = [file_digest(ctx.data_dir / f) for f in (ccfg.train_csv, ccfg.test_csv)]
    csvs += [file_digest(Path(folder) / ccfg.train_csv) for folder in ccfg.extra]
    unread = {"workers", "mask_conflict_dice"} | (set() if ctx.cfg.clean.embeddings else EMBEDDING_KEYS)
    clean_cfg = ctx.cfg.clean.model_dump(exclude=unread)
    return fingerprint("clean", csvs, images, ccfg.model_dump(include=READS), clean_cfg,
                       *([source.key()] if source is not None else []))


def embedding_source(ctx: Context) -> embeddings.Source:
    """The weights clean.embeddings embeds with: model.pretrained_path when set (for clean.embedding_backbone, or
    the first experiment's backbone), else the first finished fold run under WORK/runs (experiments in config
    order, folds in order). Random weights pair unrelated images, so with neither it is a one-line error."""
    cfg, ccfg = ctx.cfg, ctx.cfg.clean
    exps = experiments.resolve(cfg.model, cfg.train, cfg.predict)
    first = exps[0]
    backbone = ccfg.embedding_backbone or first.backbone
    template = first.model.pretrained_path
    if template:
        from pipeline.training.models import (  # here: timm (and its tqdm.autonotebook) only when asked
            IMAGENET,
            pretrained_file,
        )

        path = pretrained_file(template, backbone)
        return embeddings.Source(backbone, path, file_digest(path), ccfg.embedding_image_size or first.train.image_size,
                                 3, IMAGENET, "pretrained")
    for exp in exps:
        if ccfg.embedding_backbone and exp.backbone != ccfg.embedding_backbone:
            continue
        for stamp in sorted((ctx.work_dir / "runs" / exp.name).glob("fold*/best.json")):
            meta, weights = read_stamp(stamp), stamp.parent / "best.safetensors"
            if meta is None or not weights.is_file():
                continue
            return embeddings.Source(meta["backbone"], weights, file_digest(weights),
                                     ccfg.embedding_image_size or meta["image_size"], meta["in_chans"], meta["norm"],
                                     "fold")
    raise PipelineError(f"clean.embeddings=true: no weights to embed with ({backbone}); set model.pretrained_path to "
                        "a local weights file, or first run `make train` with clean.embeddings=false so a fold run "
                        f"exists under {ctx.work_dir / 'runs'}")


def embedding_pairs(frame: pd.DataFrame, source: embeddings.Source, threshold: float, device, max_pixels: int,
                    known: pd.DataFrame) -> pd.DataFrame:
    """Pairs of rows of `frame` whose embeddings are more similar than `threshold` (kind 'embedding', distance
    1 - similarity), leaving out the pairs already in `known` (exact, near, small) and pixel-identical pairs."""
    model = embeddings.load_model(source)
    vectors = embeddings.embed(model, list(frame["path"]), source.image_size, source.channels, source.norm, device,
                               max_pixels=max_pixels)
    i, j, sim = embeddings.similar_pairs(vectors, threshold)
    return dedup.embedding_pair_frame(i, j, sim, frame["pixel"].to_numpy(), known)


def check(ctx: Context) -> None:
    """clean.label_issues=drop|relabel applies the list the labels stage wrote; without it the policy would do nothing
    and say nothing, so it is refused. The labels stage cannot run first on its own: it needs models trained on the
    given labels (clean.label_issues=report)."""
    policy, task = ctx.cfg.clean.label_issues, ctx.cfg.competition.task
    if policy == "report":
        return
    if task not in ("single_label", "auto"):
        raise PipelineError(f"clean.label_issues={policy}: label issues are for single_label tasks only, this one is "
                            f"{task}; set clean.label_issues=report")
    path = label_issues_csv(ctx.work_dir)
    if not path.is_file():
        raise PipelineError(f"clean.label_issues={policy}: {path} not found; run `make labels` first with "
                            "clean.label_issues=report (it trains on the given labels and writes the list)")


def run(ctx: Context) -> dict:
    """Write clean.csv and its companions; skipped when the stamp matches the inputs."""
    check(ctx)
    stamp, cfg = ctx.work_dir / "clean.json", ctx.cfg.clean
    comp = ctx.competition
    extra = read_extra(comp, ctx.cfg.competition)
    source = embedding_source(ctx) if cfg.embeddings else None
    fp = _inputs_fingerprint(ctx, extra, source)
    issues = _label_issues_applied(ctx)
    issues_digest = None if issues is None else file_digest(issues)
    fp = fp if issues_digest is None else fingerprint(fp, issues_digest)
    if is_done(stamp, fp, [quality.clean_csv(ctx.work_dir)]):
        log.info(f"clean: up to date ({stamp})")
        return {"skipped": True}
    frame = quality.stack_rows(comp.train, extra, comp.test)
    feats = dedup.compute_features(list(frame.path), cfg.near_min_size, cfg.workers, "clean: decode + hash",
                                   cfg.max_pixels)
    frame = pd.concat([frame, pd.DataFrame(feats)], axis=1)
    frame, unreadable = quality.drop_unreadable(frame, cfg.drop_flat, ctx.data_dir / ctx.cfg.competition.test_csv)
    pairs = dedup.find_pairs(frame, cfg.near_threshold, cfg.near_duplicates, cfg.small_threshold, cfg.near_confirm)
    if source is not None:
        device = runtime.pick_device(ctx.cfg.runtime.device)
        found = embedding_pairs(frame, source, cfg.embedding_threshold, device, cfg.max_pixels, pairs)
        pairs = pd.concat([pairs, found], ignore_index=True)
    pairs, set_aside = dedup.plausible_pairs(pairs, len(frame))
    if len(set_aside):
        counts = set_aside["kind"].value_counts()
        settings = dict.fromkeys(s for kind in counts.index for s in SETTING_OF_KIND[kind])
        log.warning(f"clean: {len(set_aside)} similar pairs ({', '.join(f'{n} {k}' for k, n in counts.items())}) "
                    f"among {len(frame)} images are more than duplicates explain, so only exact copies are grouped and "
                    f"none of those pairs is acted on; look at {', '.join(settings)} (or clean.near_duplicates=false)")
    frame["group"] = dedup.groups(len(frame), pairs["a"].to_numpy(), pairs["b"].to_numpy())
    kept, dropped_kept = quality.keep_rows(frame, cfg)
    kept, label_dropped, relabelled, label_counts = quality.apply_label_issues(kept, issues, cfg.label_issues,
                                                                               comp.class_index)
    _write_relabelled(ctx.work_dir / "relabelled.csv", relabelled)
    dropped = quality.join_dropped([unreadable, *dropped_kept, label_dropped])
    _check_classes_left(ctx, kept[kept.split == "train"], dropped)
    summary = _write_outputs(ctx, frame, kept, dropped, pairs, len(extra), len(set_aside))
    write_stamp(stamp, fp, classes=comp.classes, task=comp.task, **summary, label_issues_applied=issues_digest)
    log.info("clean: " + ", ".join(f"{k}={v}" for k, v in {**summary, **label_counts}.items()))
    if note := quality.flat_note(frame, dropped):
        log.info(note)
    return summary


def _label_issues_applied(ctx: Context) -> Path | None:
    """WORK/label_issues.csv (written by the labels stage, pipeline/stages/label_issues.py) when clean.label_issues
    (drop, relabel) applies it; else None."""
    return None if ctx.cfg.clean.label_issues == "report" else label_issues_csv(ctx.work_dir)


def _write_relabelled(path: Path, relabelled: pd.DataFrame | None) -> None:
    """WORK/relabelled.csv when rows were relabelled; removed when none was (None: left as it is)."""
    if relabelled is None:
        return
    if len(relabelled):
        write_csv(path, relabelled)
    elif path.exists():
        os.remove(path)  # our own artifact from an earlier relabel run


def _check_classes_left(ctx: Context, kept: pd.DataFrame, dropped: pd.DataFrame) -> None:
    """Every class keeps at least one training image, or the stage stops (with dropped.csv written to show why;
    quality.no_images_left says why)."""
    comp = ctx.competition
    empty = quality.classes_without_images(kept, comp.classes, comp.task, comp.separator)
    if not empty:
        return
    write_csv(ctx.work_dir / "dropped.csv", dropped[DROPPED_COLUMNS])
    raise quality.no_images_left(empty, kept, dropped, comp.task, comp.separator,
                                 ctx.data_dir / ctx.cfg.competition.train_csv, ctx.work_dir / "dropped.csv")


def _write_outputs(ctx: Context, frame: pd.DataFrame, kept: pd.DataFrame, dropped: pd.DataFrame, pairs: pd.DataFrame,
                   n_extra: int, n_set_aside: int) -> dict:
    comp, cfg, work = ctx.competition, ctx.cfg.clean, ctx.work_dir
    cols = ["id", "label", "y", "group", "path"] + (["user_group"] if "user_group" in kept.columns else []) + ["source"]
    write_csv(quality.clean_csv(work), kept[cols])
    dup = quality.duplicates_table(frame, pairs)
    write_csv(work / "duplicates.csv", dup)
    write_csv(work / "dropped.csv", dropped[DROPPED_COLUMNS])
    write_json(work / "classes.json",
               {"classes": comp.classes, "index": comp.class_index, "label_column": comp.label_column})
    overrides = quality.label_overrides(frame, kept[kept.split == "train"], pairs)  # the competition's labels only
    if cfg.transfer_test_labels:
        write_csv(work / "test_label_overrides.csv", overrides)
    elif (work / "test_label_overrides.csv").exists():
        os.remove(work / "test_label_overrides.csv")  # our own artifact from an earlier opt-in run
    summary = quality.summary(len(comp.train), frame, kept, dropped, pairs, dup, len(overrides), cfg, n_set_aside)
    if ctx.cfg.competition.extra:
        summary.update(quality.extra_summary(n_extra, frame, kept, dropped))
    sources = quality.source_table(ctx.cfg.competition.extra, kept, dropped) if ctx.cfg.competition.extra else None
    report.write_clean_report(work / "report" / "clean.html", frame, dup, dropped, summary, cfg.report_groups, sources,
                              quality.flat_note(frame, dropped))
    return summary
