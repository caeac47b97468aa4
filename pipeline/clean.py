"""Clean stage: unreadable and flat images, exact and near duplicates, label conflicts.

Every image (train and test) is decoded once in worker processes (pipeline/dedup.py computes its
fingerprints). Undecodable or single-colour training images are dropped with the reason; an
undecodable test image is an error, since the submission needs a prediction for it. Exact and near
duplicates become groups (union-find over the pairs); groups whose training labels disagree are
dropped or resolved by majority; one copy of each pixel-identical training group is kept. The
raw folder is never touched. Writes clean.csv (kept rows with their group), duplicates.csv (every
pair), dropped.csv (id, reason), report/clean.html, optionally test_label_overrides.csv, and the
stamp clean.json.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import numpy as np
import pandas as pd
from tqdm import tqdm

from . import dedup, report
from .artifacts import content_key, file_digest, fingerprint, is_done, write_csv, write_json, write_stamp
from .context import Context
from .errors import PipelineError
from .images import MAX_PIXELS


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


# the competition keys clean reads (metric, channels, name and sample_submission_csv do not change its outputs)
READS = {"train_csv", "test_csv", "id_column", "label_column", "group_column", "image_dir", "image_suffix"}


def _inputs_fingerprint(ctx: Context) -> str:
    """What clean reads: both CSVs, the bytes of every train and test image (test images are checked for
    readability and duplicates of training images), how the CSVs are read, and the clean keys but `workers`."""
    comp = ctx.competition
    images = content_key(pd.concat([comp.train.path, comp.test.path]))
    csvs = [file_digest(ctx.data_dir / f) for f in (ctx.cfg.competition.train_csv, ctx.cfg.competition.test_csv)]
    clean_cfg = ctx.cfg.clean.model_dump(exclude={"workers"})
    return fingerprint("clean", csvs, images, ctx.cfg.competition.model_dump(include=READS), clean_cfg)


def find_pairs(frame: pd.DataFrame, threshold: int, near: bool) -> pd.DataFrame:
    """Duplicate pairs among the rows of `frame` (positional indices a < b): exact first, then near."""
    first = frame.groupby("pixel").cumcount() > 0
    anchor = frame.reset_index(drop=True).groupby("pixel").ngroup()
    first_pos = pd.Series(np.arange(len(frame))).groupby(anchor.to_numpy()).transform("first").to_numpy()
    exact = pd.DataFrame({"a": first_pos[first.to_numpy()], "b": np.nonzero(first.to_numpy())[0], "distance": 0, "kind": "exact"})
    hashed = np.nonzero(frame["phash"].notna().to_numpy())[0]
    if not near or len(hashed) < 2:
        return exact
    codes = frame["phash"].iloc[hashed].tolist(), frame["dhash"].iloc[hashed].tolist()
    i, j, dist = dedup.near_pairs(np.array(codes[0], dtype=np.uint64), np.array(codes[1], dtype=np.uint64), threshold)
    near_pairs = pd.DataFrame({"a": hashed[i], "b": hashed[j], "distance": dist, "kind": "near"})
    same_pixels = frame["pixel"].to_numpy()[near_pairs["a"]] == frame["pixel"].to_numpy()[near_pairs["b"]]
    return pd.concat([exact, near_pairs[~same_pixels]], ignore_index=True)


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


def label_overrides(frame: pd.DataFrame, kept: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Known labels for test rows grouped with kept training rows that agree on one label."""
    labels = kept.groupby("group")["label"].agg(lambda s: s.iloc[0] if s.nunique() == 1 else None).dropna()
    source = kept.drop_duplicates("group").set_index("group")["id"]
    test = frame[(frame["split"] == "test") & frame["group"].isin(labels.index)]
    return pd.DataFrame({"id": test["id"], "label": test["group"].map(labels), "train_id": test["group"].map(source)})


def run(ctx: Context) -> dict:
    """Write clean.csv and its companions; skipped when the stamp matches the inputs."""
    stamp, cfg = ctx.work_dir / "clean.json", ctx.cfg.clean
    fp = _inputs_fingerprint(ctx)
    if is_done(stamp, fp, [ctx.work_dir / "clean.csv"]):
        print(f"clean: up to date ({stamp})")
        return {"skipped": True}
    comp = ctx.competition
    feats = compute_features(list(comp.train.path) + list(comp.test.path), cfg.near_min_size, cfg.workers, "clean: decode + hash",
                             cfg.max_pixels)
    frame = pd.concat([comp.train.assign(split="train"), comp.test.assign(split="test", label="", y=-1)], ignore_index=True)
    frame = pd.concat([frame, pd.DataFrame(feats)], axis=1)
    test_err = frame[(frame.split == "test") & frame.error.notna()]
    if len(test_err):
        line = int(test_err.line.iloc[0])
        raise PipelineError(f"{ctx.data_dir / ctx.cfg.competition.test_csv} line {line}: {test_err.error.iloc[0]}; every test image must be readable")
    bad = frame.error.notna() | (frame.flat.fillna(False).astype(bool) & (frame.split == "train") & cfg.drop_flat)
    dropped = [frame[bad].assign(reason=np.where(frame.error[bad].notna(), frame.error[bad], "single flat colour"))]
    frame = frame[~bad].reset_index(drop=True)
    pairs = find_pairs(frame, cfg.near_threshold, cfg.near_duplicates)
    frame["group"] = dedup.groups(len(frame), pairs["a"].to_numpy(), pairs["b"].to_numpy())
    kept, conflicts = resolve_conflicts(frame[frame.split == "train"], cfg.conflicts)
    copies = kept[kept.duplicated("pixel")] if cfg.drop_exact_duplicates else kept.iloc[:0]
    kept = kept.drop(copies.index)
    dropped += [conflicts, copies.assign(reason="exact duplicate of a kept image")]
    dropped = pd.concat(dropped)
    _check_classes_left(ctx, kept, dropped)
    summary = _write_outputs(ctx, frame, kept, dropped, pairs)
    write_stamp(stamp, fp, classes=comp.classes, **summary)
    print("clean: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return summary


def _check_classes_left(ctx: Context, kept: pd.DataFrame, dropped: pd.DataFrame) -> None:
    """Every class keeps at least one training image, or the stage stops (with dropped.csv written to show why).

    A class without training images cannot be learnt; keeping it would train a head that never sees it and
    submit it by chance, and dropping it silently would change the submission's class set (sample_submission's
    probability columns). So the user decides: fix the images or remove the class's rows.
    """
    empty = [c for c in ctx.competition.classes if c not in set(kept["label"])]
    if not empty:
        return
    write_csv(ctx.work_dir / "dropped.csv", dropped[["id", "split", "label", "reason"]])
    csv, see = ctx.data_dir / ctx.cfg.competition.train_csv, ctx.work_dir / "dropped.csv"
    if kept.empty:
        first = dropped[dropped.split == "train"].iloc[0]
        raise PipelineError(f"{csv}: every training image was dropped ({_reasons(dropped)}), e.g. line {first.line}: {first.reason}; "
                            f"fix the images (all listed in {see})")
    first = dropped[dropped.label == empty[0]].iloc[0]
    raise PipelineError(f"{csv}: class '{empty[0]}' has no training image left after cleaning "
                        f"({_reasons(dropped[dropped.label == empty[0]])}), e.g. line {first.line}: {first.reason}; "
                        f"fix its images or remove its rows (all listed in {see})")


def _reasons(dropped: pd.DataFrame) -> str:
    kinds = np.where(dropped.reason.str.contains("cannot decode"), "unreadable", dropped.reason)
    return ", ".join(f"{n} {kind}" for kind, n in pd.Series(kinds).value_counts().items())


def _write_outputs(ctx: Context, frame: pd.DataFrame, kept: pd.DataFrame, dropped: pd.DataFrame, pairs: pd.DataFrame) -> dict:
    comp, cfg, work = ctx.competition, ctx.cfg.clean, ctx.work_dir
    cols = ["id", "label", "y", "group", "path"] + (["user_group"] if "user_group" in kept.columns else [])
    write_csv(work / "clean.csv", kept[cols])
    a, b = frame.iloc[pairs["a"]].reset_index(drop=True), frame.iloc[pairs["b"]].reset_index(drop=True)
    dup = pd.DataFrame({"id_a": a.id, "split_a": a.split, "label_a": a.label, "id_b": b.id, "split_b": b.split, "label_b": b.label,
                        "kind": pairs["kind"], "distance": pairs["distance"], "group": a.group,
                        "phash_a": a.phash.map(_hex), "phash_b": b.phash.map(_hex)})
    write_csv(work / "duplicates.csv", dup)
    write_csv(work / "dropped.csv", dropped[["id", "split", "label", "reason"]])
    write_json(work / "classes.json", {"classes": comp.classes, "index": comp.class_index, "label_column": comp.label_column})
    overrides = label_overrides(frame, kept, pairs)
    if cfg.transfer_test_labels:
        write_csv(work / "test_label_overrides.csv", overrides)
    elif (work / "test_label_overrides.csv").exists():
        os.remove(work / "test_label_overrides.csv")  # our own artifact from an earlier opt-in run
    cross = dup[(dup.split_a == "train") != (dup.split_b == "train")]
    summary = {
        "train_rows": len(comp.train), "kept": len(kept), "unreadable": int(dropped.reason.str.contains("cannot decode").sum()),
        "flat": int((dropped.reason == "single flat colour").sum()), "conflicts_dropped": int(dropped.reason.str.startswith("label conflict").sum()),
        "duplicates_dropped": int((dropped.reason == "exact duplicate of a kept image").sum()),
        "exact_pairs": int((pairs.kind == "exact").sum()), "near_pairs": int((pairs.kind == "near").sum()),
        "train_test_pairs": len(cross), "test_labels_known": len(overrides), "test_labels_transferred": len(overrides) if cfg.transfer_test_labels else 0,
        "not_near_hashed": int(frame.phash.isna().sum()), "all_gray": bool(frame.gray.all()),
    }
    report.write_clean_report(work / "report" / "clean.html", frame, dup, dropped, summary, cfg.report_groups)
    return summary


def _hex(code) -> str:
    return "" if not isinstance(code, list) else f"{code[0]:016x}"
