"""Clean stage: unreadable files and exact duplicates (same decoded pixels, not just same bytes).

Every image is decoded once (worker threads, progress bar), normalised (gray RGB counts as gray) and
hashed. Training rows that cannot be decoded are dropped with the reason; an undecodable test image
is an error, since the submission needs a prediction for it. Identical training images form a
group: groups whose labels disagree are dropped (or resolved by majority), and by default one image
of each group is kept. Train/test duplicates are reported. Writes clean.csv, duplicates.csv,
dropped.csv and the stamp clean.json (which also records whether every image is grayscale).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .artifacts import file_digest, fingerprint, is_done, write_csv, write_json, write_stamp
from .context import Context
from .errors import PipelineError
from .images import is_gray, load_image


def _pixel_hash(path: str) -> tuple[str | None, bool, str | None]:
    """(hash, is_gray, error) of the decoded pixels."""
    try:
        arr = load_image(path)
    except PipelineError as exc:
        return None, False, str(exc)
    gray = is_gray(arr)
    if gray and arr.ndim == 3:
        arr = arr[..., 0]
    digest = hashlib.sha1(str(arr.shape).encode() + arr.tobytes()).hexdigest()
    return digest, gray, None


def hash_images(paths: list[str], desc: str) -> list[tuple[str | None, bool, str | None]]:
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(_pixel_hash, paths, chunksize=16), total=len(paths), desc=desc, unit="img", disable=None))


def _inputs_fingerprint(ctx: Context) -> str:
    comp = ctx.competition
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in pd.concat([comp.train.path, comp.test.path])]
    csvs = [file_digest(ctx.data_dir / f) for f in (ctx.cfg.competition.train_csv, ctx.cfg.competition.test_csv)]
    return fingerprint("clean", csvs, stats, ctx.cfg.competition.model_dump(), ctx.cfg.clean.model_dump())


def _resolve_conflicts(train: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drop (or majority-vote) duplicate groups whose labels disagree; return (kept, dropped)."""
    n_labels = train.groupby("group")["label"].transform("nunique")
    conflict = n_labels > 1
    if policy == "majority":
        counts = train[conflict].groupby(["group", "label"]).size().rename("votes").reset_index()
        top = counts.sort_values("votes", ascending=False).groupby("group")
        best = top.head(1).set_index("group")
        tied = top["votes"].apply(lambda v: len(v) > 1 and v.iloc[0] == v.iloc[1])
        winner = best["label"].where(~tied.reindex(best.index, fill_value=False))
        keep = conflict & (train["label"] == train["group"].map(winner))
        drop_mask = conflict & ~keep
        reason = "label conflict in duplicate group (lost the majority vote or tied)"
    else:
        drop_mask = conflict
        reason = "label conflict in duplicate group"
    dropped = train[drop_mask].assign(reason=reason)
    return train[~drop_mask], dropped


def _duplicate_pairs(frame: pd.DataFrame) -> pd.DataFrame:
    """Each member of a group paired with the group's first member (one row per extra copy)."""
    first = frame.drop_duplicates("group").set_index("group")
    extra = frame[frame.duplicated("group", keep="first")]
    return pd.DataFrame({
        "id_a": extra["group"].map(first["id"]).to_numpy(), "split_a": extra["group"].map(first["split"]).to_numpy(),
        "id_b": extra["id"].to_numpy(), "split_b": extra["split"].to_numpy(), "kind": "exact",
    })


def run(ctx: Context) -> dict:
    """Write clean.csv and its companions; skipped when the stamp matches the inputs."""
    stamp = ctx.work_dir / "clean.json"
    fp = _inputs_fingerprint(ctx)
    if is_done(stamp, fp):
        print(f"clean: up to date ({stamp})")
        return {"skipped": True}
    comp = ctx.competition
    train_h = hash_images(list(comp.train.path), "clean: decode train")
    test_h = hash_images(list(comp.test.path), "clean: decode test")
    for (digest, _, err), line in zip(test_h, range(2, len(test_h) + 2), strict=True):
        if digest is None:
            raise PipelineError(f"{ctx.data_dir / ctx.cfg.competition.test_csv} line {line}: {err}; every test image must be readable")
    train = comp.train.assign(hash=[h[0] for h in train_h], split="train")
    test = comp.test.assign(hash=[h[0] for h in test_h], split="test", label="", y=-1)
    unreadable = train[train.hash.isna()].assign(reason=[h[2] for h in train_h if h[0] is None])
    frame = pd.concat([train[train.hash.notna()], test], ignore_index=True)
    frame["group"] = pd.factorize(frame["hash"])[0]
    pairs = _duplicate_pairs(frame)
    kept, conflicts = _resolve_conflicts(frame[frame.split == "train"], ctx.cfg.clean.conflicts)
    extra_copies = kept[kept.duplicated("group")] if ctx.cfg.clean.drop_exact_duplicates else kept.iloc[:0]
    kept = kept.drop(extra_copies.index)
    dropped = pd.concat([unreadable, conflicts, extra_copies.assign(reason="exact duplicate of a kept image")])
    cols = ["id", "label", "y", "group", "path"]
    write_csv(ctx.work_dir / "clean.csv", kept[cols])
    write_csv(ctx.work_dir / "duplicates.csv", pairs)
    write_csv(ctx.work_dir / "dropped.csv", dropped[["id", "label", "reason"]])
    summary = {
        "train_rows": len(train), "kept": len(kept), "unreadable": len(unreadable), "conflicts_dropped": len(conflicts),
        "duplicates_dropped": len(extra_copies), "duplicate_pairs": len(pairs),
        "train_test_pairs": int(((pairs.split_a == "train") != (pairs.split_b == "train")).sum()),
        "all_gray": bool(np.all([h[1] for h in train_h + test_h if h[0] is not None])),
    }
    write_json(ctx.work_dir / "classes.json", {"classes": comp.classes, "index": comp.class_index, "label_column": comp.label_column})
    write_stamp(stamp, fp, classes=comp.classes, **summary)
    print("clean: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return summary
