"""Clean stage: unreadable and flat images, exact and near duplicates, label conflicts.

Every image (train and test) is decoded once in worker processes (pipeline/data/dedup.py computes its
fingerprints). Undecodable or single-colour training images are dropped with the reason; an
undecodable test image is an error, since the submission needs a prediction for it. Exact and near
duplicates (perceptual hashes; images below clean.near_min_size in pixel space) become groups
(connected components of the pairs; with clean.embeddings, also pairs of similar backbone embeddings,
pipeline/training/embeddings.py); groups whose training labels disagree are dropped or resolved
by majority; one copy of each pixel-identical training group is kept. The raw folder is never
touched. Writes clean.csv (kept rows with their group), duplicates.csv (every pair, with its kind: exact,
near, small or embedding, and an embedding pair's cosine similarity), dropped.csv (id, reason),
report/clean.html, optionally test_label_overrides.csv, and the stamp clean.json.

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

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

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
from pipeline.data import dedup, report
from pipeline.data.competition import read_extra
from pipeline.data.images import MAX_PIXELS
from pipeline.data.labels import split_tags
from pipeline.training import embeddings, runtime

log = logging.getLogger(__name__)


def compute_features(paths: list[str], near_min_size: int, workers: int | None, desc: str,
                     max_pixels: int = MAX_PIXELS) -> list[dict]:
    """dedup.image_features for every path, in worker processes, with a progress bar."""
    job = partial(dedup.image_features, near_min_size=near_min_size, max_pixels=max_pixels)
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(paths) < 64:
        return [job(p) for p in tqdm(paths, desc=desc, unit="img", disable=None)]
    with ProcessPoolExecutor(workers, initializer=end_with_parent, initargs=(os.getpid(),)) as pool:
        return list(tqdm(pool.map(job, paths, chunksize=32), total=len(paths), desc=desc, unit="img", disable=None))


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent(parent: int) -> None:
    """Pool initializer: the worker ends when the process that started it does, even by SIGKILL (no cleanup runs
    then, and the pool's queue would keep it decoding for minutes). Linux: the kernel kills it (prctl
    PR_SET_PDEATHSIG); on every POSIX system a daemon thread also polls for the parent's death (the worker
    reparented away).
    """
    if os.name != "posix":
        return
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    first = os.getppid()
    if first != parent and not _alive(parent):  # the parent died before this worker ran
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(first,), name="end-with-parent", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _watch_parent(first: int) -> None:
    while os.getppid() == first:
        time.sleep(0.5)
    os._exit(1)


DROPPED_COLUMNS = ["id", "split", "label", "reason", "source"]  # source: the extra folder; empty for the competition's

# the competition keys clean reads (metric, channels, name and sample_submission_csv do not change its outputs)
READS = {"train_csv", "test_csv", "id_column", "label_column", "group_column", "image_dir", "image_suffix", "extra",
         "task", "label_separator"}


EMBEDDING_KEYS = {"embedding_threshold", "embedding_backbone", "embedding_image_size"}  # read only when embeddings


def _inputs_fingerprint(ctx: Context, extra: pd.DataFrame, source: embeddings.Source | None = None) -> str:
    """What clean reads: the CSVs, the bytes of every train, extra and test image (test images are checked for
    readability and duplicates of training images), how the CSVs are read, and the clean keys but `workers`;
    with clean.embeddings, the weights that embed (their bytes, backbone, size, channels, normalisation)."""
    comp, ccfg = ctx.competition, ctx.cfg.competition
    images = content_key(pd.concat([comp.train.path, extra.path, comp.test.path]))
    csvs = [file_digest(ctx.data_dir / f) for f in (ccfg.train_csv, ccfg.test_csv)]
    csvs += [file_digest(Path(folder) / ccfg.train_csv) for folder in ccfg.extra]
    unread = {"workers"} | (set() if ctx.cfg.clean.embeddings else EMBEDDING_KEYS)
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
    pairs = pd.DataFrame({"a": i, "b": j, "distance": np.round(1.0 - sim, 6), "kind": "embedding",
                          "similarity": np.round(sim, 6)})
    pixel = frame["pixel"].to_numpy()
    seen = set(zip(known["a"].tolist(), known["b"].tolist(), strict=True))
    new = [(a, b) not in seen and pixel[a] != pixel[b] for a, b in zip(pairs["a"], pairs["b"], strict=True)]
    return pairs[np.array(new, dtype=bool)]


def find_pairs(frame: pd.DataFrame, threshold: int, near: bool, small_threshold: float = 0.2) -> pd.DataFrame:
    """Duplicate pairs among the rows of `frame` (positional indices a < b): exact first, then near (perceptual
    hashes, kind 'near'), then small (images below clean.near_min_size, compared in pixel space: kind 'small')."""
    first = frame.groupby("pixel").cumcount() > 0
    anchor = frame.reset_index(drop=True).groupby("pixel").ngroup()
    first_pos = pd.Series(np.arange(len(frame))).groupby(anchor.to_numpy()).transform("first").to_numpy()
    exact = pd.DataFrame({"a": first_pos[first.to_numpy()], "b": np.nonzero(first.to_numpy())[0], "distance": 0,
                          "kind": "exact"})
    if not near:
        return exact
    found = [exact]
    hashed = np.nonzero(frame["phash"].notna().to_numpy())[0]
    if len(hashed) >= 2:
        codes = frame["phash"].iloc[hashed].tolist(), frame["dhash"].iloc[hashed].tolist()
        i, j, dist = dedup.near_pairs(np.array(codes[0], dtype=np.uint64), np.array(codes[1], dtype=np.uint64),
                                      threshold)
        found.append(pd.DataFrame({"a": hashed[i], "b": hashed[j], "distance": dist, "kind": "near"}))
    small = np.nonzero(frame["small"].notna().to_numpy())[0] if "small" in frame else np.zeros(0, int)
    if len(small) >= 2:
        i, j, dist = dedup.small_pairs(np.stack(frame["small"].iloc[small].tolist()), small_threshold)
        found.append(pd.DataFrame({"a": small[i], "b": small[j], "distance": np.round(dist, 4), "kind": "small"}))
    pairs = pd.concat(found, ignore_index=True)
    pixel = frame["pixel"].to_numpy()
    return pairs[(pairs["kind"] == "exact") | (pixel[pairs["a"]] != pixel[pairs["b"]])].reset_index(drop=True)


def resolve_conflicts(train: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drop (or majority-vote) duplicate groups whose labels disagree; return (kept, dropped)."""
    conflict = train.groupby("group")["label"].transform("nunique") > 1
    if policy == "majority":
        votes = train[conflict].groupby(["group", "label"]).size().rename("votes").reset_index()
        votes = votes.sort_values(["group", "votes"], ascending=[True, False])
        top = votes.groupby("group").head(2).groupby("group")["votes"].agg(list)
        tied = top.map(lambda v: len(v) > 1 and v[0] == v[1])
        winner = votes.groupby("group").head(1).set_index("group")["label"][~tied]
        keep = conflict & (train["label"] == train["group"].map(winner))
        drop_mask, reason = conflict & ~keep, "label conflict in duplicate group (lost the majority vote or tied)"
    else:
        drop_mask, reason = conflict, "label conflict in duplicate group"
    return train[~drop_mask], train[drop_mask].assign(reason=reason)


def screen_extra(frame: pd.DataFrame, keep_leaks: bool, policy: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Extra rows (split 'extra') that may join the training rows; return (kept, dropped with reasons).

    Grouped with a test image: a leak, dropped unless keep_leaks. Grouped with a competition training image: a
    duplicate of it, dropped (the training row stays). The rest: conflicts among themselves as `policy` says.
    """
    extra = frame[frame["split"] == "extra"]
    test_id = extra["group"].map(frame[frame["split"] == "test"].groupby("group")["id"].first())
    train_id = extra["group"].map(frame[frame["split"] == "train"].groupby("group")["id"].first())
    leak = test_id.notna() & (not keep_leaks)
    copy = train_id.notna() & ~leak
    dropped = [extra[leak].assign(reason="extra image duplicates a test image (leak): test id "
                                  + test_id[leak].astype(str)),
               extra[copy].assign(reason="extra image duplicates a training image (kept): train id "
                                  + train_id[copy].astype(str))]
    kept, conflicts = resolve_conflicts(extra[~leak & ~copy], policy)
    return kept, pd.concat([*dropped, conflicts])


def label_overrides(frame: pd.DataFrame, kept: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Known labels for test rows grouped with kept training rows that agree on one label."""
    labels = kept.groupby("group")["label"].agg(lambda s: s.iloc[0] if s.nunique() == 1 else None).dropna()
    source = kept.drop_duplicates("group").set_index("group")["id"]
    test = frame[(frame["split"] == "test") & frame["group"].isin(labels.index)]
    return pd.DataFrame({"id": test["id"], "label": test["group"].map(labels), "train_id": test["group"].map(source)})


def run(ctx: Context) -> dict:
    """Write clean.csv and its companions; skipped when the stamp matches the inputs."""
    stamp, cfg = ctx.work_dir / "clean.json", ctx.cfg.clean
    comp = ctx.competition
    extra = read_extra(comp, ctx.cfg.competition)
    source = embedding_source(ctx) if cfg.embeddings else None
    fp = _inputs_fingerprint(ctx, extra, source)
    issues_digest = _label_issues_digest(ctx)
    fp = fp if issues_digest is None else fingerprint(fp, issues_digest)
    if is_done(stamp, fp, [ctx.work_dir / "clean.csv"]):
        log.info(f"clean: up to date ({stamp})")
        return {"skipped": True}
    parts = [comp.train.assign(split="train", source=""), extra.assign(split="extra"),
             comp.test.assign(split="test", label="", y=-1, source="")]
    frame = pd.concat([p for p in parts if len(p)], ignore_index=True)
    feats = compute_features(list(frame.path), cfg.near_min_size, cfg.workers, "clean: decode + hash", cfg.max_pixels)
    frame = pd.concat([frame, pd.DataFrame(feats)], axis=1)
    test_err = frame[(frame.split == "test") & frame.error.notna()]
    if len(test_err):
        line = int(test_err.line.iloc[0])
        raise PipelineError(f"{ctx.data_dir / ctx.cfg.competition.test_csv} line {line}: {test_err.error.iloc[0]}; "
                            "every test image must be readable")
    bad = frame.error.notna() | (frame.flat.fillna(False).astype(bool) & (frame.split != "test") & cfg.drop_flat)
    dropped = [frame[bad].assign(reason=np.where(frame.error[bad].notna(), frame.error[bad], "single flat colour"))]
    frame = frame[~bad].reset_index(drop=True)
    pairs = find_pairs(frame, cfg.near_threshold, cfg.near_duplicates, cfg.small_threshold)
    if source is not None:
        device = runtime.pick_device(ctx.cfg.runtime.device)
        found = embedding_pairs(frame, source, cfg.embedding_threshold, device, cfg.max_pixels, pairs)
        pairs = pd.concat([pairs, found], ignore_index=True)
    frame["group"] = dedup.groups(len(frame), pairs["a"].to_numpy(), pairs["b"].to_numpy())
    kept, conflicts = resolve_conflicts(frame[frame.split == "train"], cfg.conflicts)
    kept_extra, dropped_extra = screen_extra(frame, cfg.keep_extra_leaks, cfg.conflicts)
    kept = pd.concat([kept, kept_extra])  # training rows first: an extra copy of one is the copy dropped
    copies = kept[kept.duplicated("pixel")] if cfg.drop_exact_duplicates else kept.iloc[:0]
    kept = kept.drop(copies.index)
    kept, label_dropped, label_counts = apply_label_issues(ctx, kept, issues_digest)
    dropped += [conflicts, dropped_extra, copies.assign(reason="exact duplicate of a kept image"), label_dropped]
    dropped = pd.concat([d for d in dropped if len(d)]) if any(len(d) for d in dropped) else dropped[0]
    _check_classes_left(ctx, kept[kept.split == "train"], dropped)
    summary = _write_outputs(ctx, frame, kept, dropped, pairs, len(extra))
    write_stamp(stamp, fp, classes=comp.classes, task=comp.task, **summary, label_issues_applied=issues_digest)
    log.info("clean: " + ", ".join(f"{k}={v}" for k, v in {**summary, **label_counts}.items()))
    return summary


def _label_issues_digest(ctx: Context) -> str | None:
    """The bytes of WORK/label_issues.csv when clean.label_issues (drop, relabel) applies it; else None."""
    path = ctx.work_dir / "label_issues.csv"
    return file_digest(path) if ctx.cfg.clean.label_issues != "report" and path.exists() else None


def apply_label_issues(ctx: Context, kept: pd.DataFrame, digest: str | None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Drop or relabel the training rows listed in WORK/label_issues.csv (the labels stage), as clean.label_issues says.

    Returns (kept, dropped with the reason, counts). Only competition rows can be listed (the labels stage sees the
    OOF rows, and extra rows have none). Relabelled rows are listed in WORK/relabelled.csv (id, given, label,
    self_confidence); the file is removed when no row is relabelled, so it never describes an earlier run.
    Applied here, before the folds, so folds stratify on the cleaned labels and every later stage sees them.
    """
    work, policy = ctx.work_dir, ctx.cfg.clean.label_issues
    relabelled = pd.DataFrame(columns=["id", "given", "label", "self_confidence"])
    if digest is not None:
        path, index = work / "label_issues.csv", ctx.competition.class_index
        issues = pd.read_csv(path, dtype={"id": str, "given_label": str, "suggested_label": str})
        if missing := {"id", "suggested_label", "self_confidence"} - set(issues.columns):
            raise PipelineError(f"{path}: no column {sorted(missing)[0]}; rerun `make labels`")
        issues = issues.drop_duplicates("id").set_index("id")
        mask = (kept["split"] == "train") & kept["id"].isin(issues.index)
        new = kept.loc[mask, "id"].map(issues["suggested_label"])
        if not new.isin(index).all():
            bad = new[~new.isin(index)].iloc[0]
            raise PipelineError(f"{path}: suggested label '{bad}' is not a class of this competition; "
                                "rerun `make labels`")
        if policy == "drop":
            return kept[~mask], kept[mask].assign(reason="label issue (cleanlab)"), {"label_issues_dropped": len(new)}
        relabelled = pd.DataFrame({"id": kept.loc[mask, "id"], "given": kept.loc[mask, "label"], "label": new,
                                   "self_confidence": kept.loc[mask, "id"].map(issues["self_confidence"])})
        kept = kept.assign(label=kept["label"].where(~mask, new), y=kept["y"].where(~mask, new.map(index)).astype(int))
    if len(relabelled):
        write_csv(work / "relabelled.csv", relabelled)
    elif (work / "relabelled.csv").exists():
        os.remove(work / "relabelled.csv")  # our own artifact from an earlier relabel run
    return kept, kept.iloc[:0].assign(reason=""), {"relabelled": len(relabelled)} if digest else {}


def _check_classes_left(ctx: Context, kept: pd.DataFrame, dropped: pd.DataFrame) -> None:
    """Every class keeps at least one training image, or the stage stops (with dropped.csv written to show why).

    A class without training images cannot be learnt; keeping it would train a head that never sees it and
    submit it by chance, and dropping it silently would change the submission's class set (sample_submission's
    probability columns). So the user decides: fix the images or remove the class's rows.
    """
    comp = ctx.competition
    present = set(kept["label"]) if comp.task != "multi_label" else {
        t for label in kept["label"] for t in split_tags(label.strip(), comp.separator)}
    empty = [c for c in comp.classes if c not in present]
    if not empty:
        return
    write_csv(ctx.work_dir / "dropped.csv", dropped[DROPPED_COLUMNS])
    dropped = dropped[dropped.split == "train"]  # the competition's own rows explain its classes
    csv, see = ctx.data_dir / ctx.cfg.competition.train_csv, ctx.work_dir / "dropped.csv"
    if kept.empty:
        first = dropped[dropped.split == "train"].iloc[0]
        raise PipelineError(f"{csv}: every training image was dropped ({_reasons(dropped)}), e.g. line {first.line}: "
                            f"{first.reason}; fix the images (all listed in {see})")
    holds = dropped.label.map(lambda v: empty[0] in split_tags(v.strip(), comp.separator)
                              if comp.task == "multi_label" else v == empty[0])
    first = dropped[holds].iloc[0]
    raise PipelineError(f"{csv}: class '{empty[0]}' has no training image left after cleaning "
                        f"({_reasons(dropped[holds])}), e.g. line {first.line}: {first.reason}; "
                        f"fix its images or remove its rows (all listed in {see})")


def _reasons(dropped: pd.DataFrame) -> str:
    kinds = np.where(dropped.reason.str.contains("cannot decode"), "unreadable", dropped.reason)
    return ", ".join(f"{n} {kind}" for kind, n in pd.Series(kinds).value_counts().items())


def _write_outputs(ctx: Context, frame: pd.DataFrame, kept: pd.DataFrame, dropped: pd.DataFrame, pairs: pd.DataFrame,
                   n_extra: int) -> dict:
    comp, cfg, work = ctx.competition, ctx.cfg.clean, ctx.work_dir
    cols = ["id", "label", "y", "group", "path"] + (["user_group"] if "user_group" in kept.columns else []) + ["source"]
    write_csv(work / "clean.csv", kept[cols])
    a, b = frame.iloc[pairs["a"]].reset_index(drop=True), frame.iloc[pairs["b"]].reset_index(drop=True)
    dup = pd.DataFrame({"id_a": a.id, "split_a": a.split, "label_a": a.label,
                        "id_b": b.id, "split_b": b.split, "label_b": b.label,
                        "kind": pairs["kind"], "distance": pairs["distance"],
                        "similarity": pairs["similarity"] if "similarity" in pairs else np.nan, "group": a.group,
                        "phash_a": a.phash.map(_hex), "phash_b": b.phash.map(_hex), "source_a": a.source,
                        "source_b": b.source})
    write_csv(work / "duplicates.csv", dup)
    write_csv(work / "dropped.csv", dropped[DROPPED_COLUMNS])
    write_json(work / "classes.json",
               {"classes": comp.classes, "index": comp.class_index, "label_column": comp.label_column})
    own, own_dropped = kept[kept.split == "train"], dropped[dropped.split != "extra"]
    overrides = label_overrides(frame, own, pairs)  # from the competition's own labels only
    if cfg.transfer_test_labels:
        write_csv(work / "test_label_overrides.csv", overrides)
    elif (work / "test_label_overrides.csv").exists():
        os.remove(work / "test_label_overrides.csv")  # our own artifact from an earlier opt-in run
    train_test = (((dup.split_a == "train") & (dup.split_b == "test"))
                  | ((dup.split_a == "test") & (dup.split_b == "train")))
    reasons = own_dropped.reason
    summary = {
        "train_rows": len(comp.train), "kept": len(own), "unreadable": int(reasons.str.contains("cannot decode").sum()),
        "flat": int((reasons == "single flat colour").sum()),
        "conflicts_dropped": int(reasons.str.startswith("label conflict").sum()),
        "duplicates_dropped": int((reasons == "exact duplicate of a kept image").sum()),
        "exact_pairs": int((pairs.kind == "exact").sum()), "near_pairs": int((pairs.kind == "near").sum()),
        "small_pairs": int((pairs.kind == "small").sum()),
        "train_test_pairs": int(train_test.sum()), "test_labels_known": len(overrides),
        "test_labels_transferred": len(overrides) if cfg.transfer_test_labels else 0,
        "not_near_hashed": int(frame.phash.isna().sum()), "small_compared": int(frame.small.notna().sum()),
        "all_gray": bool(frame.gray.all()),
    }
    if cfg.embeddings:
        summary["embedding_pairs"] = int((pairs.kind == "embedding").sum())
    if ctx.cfg.competition.extra:
        summary.update(_extra_summary(n_extra, frame, kept, dropped))
    sources = _source_table(ctx.cfg.competition.extra, kept, dropped) if ctx.cfg.competition.extra else None
    report.write_clean_report(work / "report" / "clean.html", frame, dup, dropped, summary, cfg.report_groups, sources)
    return summary


def _extra_summary(n_extra: int, frame: pd.DataFrame, kept: pd.DataFrame, dropped: pd.DataFrame) -> dict:
    """Counts of the extra rows: read, kept, leaks found (and dropped), duplicates of training images dropped."""
    extra, reasons = frame[frame.split == "extra"], dropped.reason[dropped.split == "extra"]
    return {"extra_rows": n_extra, "extra_kept": int((kept.split == "extra").sum()),
            "extra_leaks": int(extra.group.isin(set(frame.group[frame.split == "test"])).sum()),
            "extra_leaks_dropped": int(reasons.str.startswith("extra image duplicates a test").sum()),
            "extra_duplicates_dropped": int(reasons.str.startswith("extra image duplicates a training").sum())}


def _source_table(folders: list[str], kept: pd.DataFrame, dropped: pd.DataFrame) -> pd.DataFrame:
    """One row per extra folder: rows kept, and rows dropped per reason (the part before ':')."""
    gone = dropped[dropped.split == "extra"]
    table = pd.crosstab(gone.source, gone.reason.str.split(":").str[0]).reindex(folders, fill_value=0)
    table.insert(0, "kept", kept[kept.split == "extra"].source.value_counts().reindex(folders, fill_value=0))
    return table.rename_axis("folder").reset_index()


def _hex(code) -> str:
    return "" if not isinstance(code, list) else f"{code[0]:016x}"
