"""Clean stage on a segmentation folder: unreadable images, exact and near duplicates, masks that disagree.

The folder is read by the segment stage's reader (pipeline/segmentation/data.py, through stages/segment.read_data),
so clean sees the images and masks the segment stage trains on. Every training and test image is decoded once and
fingerprinted, and pairs are found and grouped with the classification settings and library (clean.* keys,
pipeline/data/dedup.py). Then:

- an undecodable training image is reported in dropped.csv and left out of clean.csv; an undecodable test image
  is an error naming its line of test.csv (the submission needs it);
- flat (single-colour) images are kept and never paired, as for every task: an empty canvas with an empty mask is
  an example, not a copy (clean.drop_flat does not apply: masks, not labels, say what such an image shows);
- the masks of each duplicate pair of training images are compared class by class (segmentation/quality.py): a
  pair whose lowest Dice is below clean.mask_conflict_dice is a mask conflict, reported in duplicates.csv, in the
  log and in the stamp, and kept: the raw folder is never touched and nothing is dropped for it;
- the share of empty masks per class, over every training image of train.csv, goes to empty_masks.csv, the stamp
  and the log.

Nothing else is dropped: the segment stage trains on the images clean.csv lists and reads its duplicate groups,
which it keeps in one fold (its `image_groups`). Writes clean.csv (id, classes present, group, path),
duplicates.csv, dropped.csv, empty_masks.csv, report/clean.html and the stamp clean.json, whose key is what the stage
reads: train.csv's and test.csv's bytes, the mask files' bytes, the classes, every image's bytes and the clean keys
that change the result.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pipeline.context import Context
from pipeline.core.artifacts import content_key, file_digest, fingerprint, is_done, write_csv, write_stamp
from pipeline.core.errors import PipelineError
from pipeline.data import dedup, quality, report
from pipeline.segmentation import quality as masks_quality
from pipeline.segmentation.arrays import masks_key
from pipeline.segmentation.data import SegmentationData
from pipeline.stages.clean import DROPPED_COLUMNS, SETTING_OF_KIND
from pipeline.stages.segment import read_data

log = logging.getLogger(__name__)

# the clean keys that change what this stage writes (workers: speed only; the rest are classification's policies)
READS = {"near_duplicates", "near_threshold", "near_confirm", "near_min_size", "small_threshold", "max_pixels",
         "report_groups", "mask_conflict_dice"}
EMPTY = "(empty)"  # the `classes` of an image whose masks are all empty


def check(ctx: Context) -> None:
    """The clean keys and competition keys that only classification folders can honour are refused in one line."""
    cfg = ctx.cfg
    if cfg.clean.label_issues != "report":
        raise PipelineError(f"clean.label_issues={cfg.clean.label_issues}: label issues are for single_label "
                            "classification folders, this one holds masks; set clean.label_issues=report")
    if cfg.clean.embeddings:
        raise PipelineError("clean.embeddings=true: embedding pairs need a classification backbone's weights, this "
                            "folder holds masks; set clean.embeddings=false")
    if cfg.competition.extra:
        raise PipelineError("competition.extra: extra labelled folders are read for classification folders only, "
                            "this one holds masks; remove competition.extra")


def _fingerprint(ctx: Context, data: SegmentationData) -> str:
    seg = ctx.cfg.segment.data
    return fingerprint("clean-segmentation", data.train.ids, data.test.ids,
                       content_key([*data.train.paths, *data.test.paths]),
                       masks_key(data, ctx.data_dir / seg.train_csv), file_digest(ctx.data_dir / seg.test_csv),
                       ctx.cfg.clean.model_dump(include=READS))


def _rows(data: SegmentationData, present: np.ndarray) -> pd.DataFrame:
    """The clean table's rows: training then test images, with their split and, as `label`, the classes present."""
    labels = ["+".join(c for c, held in zip(data.classes, row, strict=True) if held) or EMPTY for row in present]
    train = pd.DataFrame({"id": data.train.ids, "path": data.train.paths, "line": data.train.lines,
                          "label": labels, "split": "train"})
    test = pd.DataFrame({"id": data.test.ids, "path": data.test.paths, "line": data.test.lines, "label": "",
                         "split": "test"})
    return pd.concat([train, test], ignore_index=True).assign(y=-1, source="")


def run(ctx: Context) -> dict:
    """Write clean.csv and its companions for a segmentation folder; skipped when the stamp matches the inputs."""
    check(ctx)
    cfg, work = ctx.cfg.clean, ctx.work_dir
    data = read_data(ctx)
    stamp, fp = work / "clean.json", _fingerprint(ctx, data)
    if is_done(stamp, fp, [quality.clean_csv(work)]):
        log.info(f"clean: up to date ({stamp})")
        return {"skipped": True}
    present = masks_quality.class_presence(data)
    shares = masks_quality.empty_shares(present, data.classes)
    frame = _rows(data, present)
    feats = dedup.compute_features(list(frame.path), cfg.near_min_size, cfg.workers, "clean: decode + hash",
                                   cfg.max_pixels)
    frame = pd.concat([frame, pd.DataFrame(feats)], axis=1)
    frame["row"] = np.arange(len(frame))  # a training image's index in data.train (training rows come first)
    frame, dropped = quality.drop_unreadable(frame, False, ctx.data_dir / ctx.cfg.segment.data.test_csv)
    pairs = dedup.find_pairs(frame, cfg.near_threshold, cfg.near_duplicates, cfg.small_threshold, cfg.near_confirm)
    pairs, set_aside = dedup.plausible_pairs(pairs, len(frame))
    if len(set_aside):
        counts = set_aside["kind"].value_counts()
        settings = dict.fromkeys(s for kind in counts.index for s in SETTING_OF_KIND[kind])
        log.warning(f"clean: {len(set_aside)} similar pairs ({', '.join(f'{n} {k}' for k, n in counts.items())}) "
                    f"among {len(frame)} images are more than duplicates explain, so only exact copies are grouped; "
                    f"look at {', '.join(settings)} (or clean.near_duplicates=false)")
    frame["group"] = dedup.groups(len(frame), pairs["a"].to_numpy(), pairs["b"].to_numpy())
    dup = _with_mask_dice(quality.duplicates_table(frame, pairs), frame, pairs, data, cfg.mask_conflict_dice)
    kept = frame[frame.split == "train"]
    write_csv(quality.clean_csv(work), kept.rename(columns={"label": "classes"})[["id", "classes", "group", "path"]])
    write_csv(work / "duplicates.csv", dup)
    write_csv(work / "dropped.csv", dropped[DROPPED_COLUMNS])
    write_csv(work / "empty_masks.csv", shares)
    summary = _summary(data, frame, kept, dropped, pairs, dup, len(set_aside))
    report.write_clean_report(work / "report" / "clean.html", frame, dup, dropped, summary, cfg.report_groups)
    empty_share = dict(zip(shares["class"], shares["empty_share"].astype(float), strict=True))
    write_stamp(stamp, fp, track="segmentation", classes=data.classes, empty_share=empty_share, **summary)
    log.info("clean: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    log.info("clean: empty masks per class: " + ", ".join(f"{c} {s:.1%}" for c, s in empty_share.items())
             + f" of {len(data.train)} training images ({work / 'empty_masks.csv'})")
    _log_conflicts(dup, cfg.mask_conflict_dice, work)
    if len(dropped):
        first = dropped.iloc[0]
        log.warning(f"clean: {len(dropped)} training image{'s' if len(dropped) > 1 else ''} cannot be decoded, e.g. "
                    f"{ctx.cfg.segment.data.train_csv} line {first.line}: {first.reason}; the segment stage leaves "
                    f"them out: replace the files to train on them (all in {work / 'dropped.csv'})")
    return summary


def _with_mask_dice(dup: pd.DataFrame, frame: pd.DataFrame, pairs: pd.DataFrame, data: SegmentationData,
                    threshold: float) -> pd.DataFrame:
    """duplicates.csv's rows with, for pairs of two training images, their masks' lowest Dice, whether it is a
    mask conflict and the classes that disagree (empty for pairs with a test image, which has no masks)."""
    both = ((dup["split_a"] == "train") & (dup["split_b"] == "train")).to_numpy()
    row = frame["row"].to_numpy()
    a, b = row[pairs["a"].to_numpy()[both]], row[pairs["b"].to_numpy()[both]]
    found = masks_quality.mask_conflicts(masks_quality.pair_dice(data, a, b), data.classes, threshold)
    out = dup.assign(mask_dice=np.nan, mask_conflict=False, conflict_classes="")
    out.loc[both, ["mask_dice", "mask_conflict", "conflict_classes"]] = found.to_numpy()
    return out.astype({"mask_dice": float, "mask_conflict": bool})


def _summary(data: SegmentationData, frame: pd.DataFrame, kept: pd.DataFrame, dropped: pd.DataFrame,
             pairs: pd.DataFrame, dup: pd.DataFrame, n_set_aside: int) -> dict:
    sizes = frame.groupby("group").size()
    train_test = (dup.split_a != dup.split_b).sum()
    return {"train_rows": len(data.train), "test_rows": len(data.test), "kept": len(kept),
            "unreadable": int((dropped.split == "train").sum()),
            "flat": int(quality.flat_training_rows(frame).sum()),
            "exact_pairs": int((pairs.kind == "exact").sum()), "near_pairs": int((pairs.kind == "near").sum()),
            "small_pairs": int((pairs.kind == "small").sum()), "sparse_pairs": int((pairs.kind == "sparse").sum()),
            "pairs_set_aside": n_set_aside, "duplicate_groups": int((sizes > 1).sum()),
            "train_test_pairs": int(train_test), "mask_pairs_compared": int(dup["mask_dice"].notna().sum()),
            "mask_conflicts": int(dup["mask_conflict"].sum())}


def _log_conflicts(dup: pd.DataFrame, threshold: float, work) -> None:
    conflicts = dup[dup["mask_conflict"]]
    if conflicts.empty:
        return
    shown = "; ".join(f"{r.id_a} ~ {r.id_b} ({r.conflict_classes}, Dice {r.mask_dice:.2f})"
                      for r in conflicts.head(5).itertuples())
    more = f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
    log.warning(f"clean: {len(conflicts)} duplicate pair{'s' if len(conflicts) > 1 else ''} of training images "
                f"with masks that disagree (Dice below clean.mask_conflict_dice={threshold}): {shown}{more}; both "
                f"are kept and share a fold: fix or remove one in train.csv (all in {work / 'duplicates.csv'})")
