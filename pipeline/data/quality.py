"""The clean stage's decisions on a table of images: which rows are dropped and why, which are kept.

The table (`stack_rows`) holds the competition's training rows, the extra folders' rows (split 'extra') and the
test rows, each with its fingerprints (pipeline/data/dedup.py) and, once pairs are found, its duplicate `group`.
Unreadable training images are dropped, and flat ones when asked (`drop_unreadable`, `flat_note`); groups whose
training labels disagree are dropped or resolved by majority (`resolve_conflicts`); extra rows are screened so
that they can only ever add training rows (`screen_extra`); one copy of each pixel-identical group is kept
(`keep_rows`); the labels stage's list of label issues is applied (`apply_label_issues`). The rest builds the
clean stage's tables: duplicates.csv's rows, the known labels of test images, and the summary counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.config import CleanConfig
from pipeline.core.errors import PipelineError
from pipeline.data.labels import split_tags

CLEAN_CSV = "clean.csv"
FLAT = "single flat colour"  # the reason of a flat image dropped under clean.drop_flat


def clean_csv(work_dir: Path) -> Path:
    """WORK/clean.csv, the clean stage's kept rows (id, label, y, group, path, [user_group], source): written by the
    clean stage, read by the folds stage and, for its duplicate groups, by the detect stage."""
    return Path(work_dir) / CLEAN_CSV


def stack_rows(train: pd.DataFrame, extra: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    """One table of the training, extra and test rows, with their `split` ('train', 'extra', 'test') and `source`."""
    parts = [train.assign(split="train", source=""), extra.assign(split="extra"),
             test.assign(split="test", label="", y=-1, source="")]
    return pd.concat([p for p in parts if len(p)], ignore_index=True)


def drop_unreadable(frame: pd.DataFrame, drop_flat: bool, test_csv: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows kept, rows dropped with the reason): undecodable images and, when drop_flat, single-colour training
    images, but never every image of a label. An undecodable test image is an error naming its line of test_csv:
    the submission needs it."""
    test_err = frame[(frame.split == "test") & frame.error.notna()]
    if len(test_err):
        line = int(test_err.line.iloc[0])
        raise PipelineError(f"{test_csv} line {line}: {test_err.error.iloc[0]}; every test image must be readable")
    flat = flat_training_rows(frame) & drop_flat
    readable = frame[frame.error.isna() & (frame.split != "test")]
    only_flat = readable.groupby("label")["flat"].agg(lambda f: f.fillna(False).astype(bool).all())
    flat &= ~frame["label"].map(only_flat).eq(True)  # a label shown only by flat images stays
    bad = frame.error.notna() | flat
    dropped = frame[bad].assign(reason=np.where(frame.error[bad].notna(), frame.error[bad], FLAT))
    return frame[~bad].reset_index(drop=True), dropped


def flat_training_rows(frame: pd.DataFrame) -> pd.Series:
    """Readable training and extra rows whose image is one flat colour."""
    return frame["flat"].fillna(False).astype(bool) & frame["error"].isna() & (frame["split"] != "test")


def flat_note(frame: pd.DataFrame, dropped: pd.DataFrame) -> str | None:
    """One line on the competition's flat training images, or None without any: kept or dropped, and whether their
    labels make a pattern (every flat image has one label: an "empty" class, not corruption) or disagree (a flat
    image cannot show what tells its labels apart)."""
    flat = frame[flat_training_rows(frame) & (frame["split"] == "train")]
    flat = pd.concat([flat, dropped[(dropped["split"] == "train") & (dropped["reason"] == FLAT)]])
    if flat.empty:
        return None
    n_dropped = int(((dropped["split"] == "train") & (dropped["reason"] == FLAT)).sum())
    fate = f"{n_dropped} dropped (clean.drop_flat), {len(flat) - n_dropped} kept" if n_dropped else "kept"
    labels = flat["label"].value_counts()
    if len(labels) == 1:
        what = (f"all labelled '{labels.index[0]}': a pattern (an empty class), not corruption" if len(flat) > 1
                else f"labelled '{labels.index[0]}'")
    else:
        shown = ", ".join(f"'{label}' x{n}" for label, n in labels.head(5).items())
        what = (f"with {len(labels)} labels ({shown}{', ...' if len(labels) > 5 else ''}): a flat image cannot show "
                "what tells them apart; check those labels")
    return f"clean: {len(flat)} flat training image{'s' if len(flat) > 1 else ''} {what}; {fate}"


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


def keep_rows(frame: pd.DataFrame, cfg: CleanConfig) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """The training and extra rows kept, and the dropped ones with their reasons: label conflicts among training
    rows, screened-out extra rows, and (clean.drop_exact_duplicates) every copy of a pixel-identical kept image
    but flat ones (every empty canvas is its own example of the empty label, as dedup.find_pairs says)."""
    kept, conflicts = resolve_conflicts(frame[frame.split == "train"], cfg.conflicts)
    kept_extra, dropped_extra = screen_extra(frame, cfg.keep_extra_leaks, cfg.conflicts)
    kept = pd.concat([kept, kept_extra])  # training rows first: an extra copy of one is the copy dropped
    copy = kept.duplicated("pixel") & ~kept["flat"].fillna(False).astype(bool)  # flat images are never copies
    copies = kept[copy] if cfg.drop_exact_duplicates else kept.iloc[:0]
    kept = kept.drop(copies.index)
    return kept, [conflicts, dropped_extra, copies.assign(reason="exact duplicate of a kept image")]


def join_dropped(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The dropped rows of every step, in order (the first part, empty, when none was dropped)."""
    return pd.concat([d for d in parts if len(d)]) if any(len(d) for d in parts) else parts[0]


def label_overrides(frame: pd.DataFrame, kept: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Known labels for test rows grouped with kept training rows that agree on one label."""
    labels = kept.groupby("group")["label"].agg(lambda s: s.iloc[0] if s.nunique() == 1 else None).dropna()
    source = kept.drop_duplicates("group").set_index("group")["id"]
    test = frame[(frame["split"] == "test") & frame["group"].isin(labels.index)]
    return pd.DataFrame({"id": test["id"], "label": test["group"].map(labels), "train_id": test["group"].map(source)})


def apply_label_issues(kept: pd.DataFrame, issues_csv: Path | None, policy: str, class_index: dict[str, int]
                       ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None, dict]:
    """Drop or relabel the training rows listed in issues_csv, as `policy` (clean.label_issues: drop, relabel) says;
    issues_csv is WORK/label_issues.csv, written by the labels stage (pipeline/stages/label_issues.py), or None
    when it does not apply (no file, or clean.label_issues=report).

    Returns (kept, dropped with the reason, relabelled, counts). Only competition rows can be listed (the labels
    stage sees the OOF rows, and extra rows have none). `relabelled` (id, given, label, self_confidence) lists
    the relabelled rows (empty when none was): the clean stage writes it as WORK/relabelled.csv, or removes that
    file when it is empty, so it never describes an earlier run; None under `drop`, whose run leaves the file as
    it is. Applied before the folds, so folds stratify on the cleaned labels and every later stage sees them.
    """
    relabelled = pd.DataFrame(columns=["id", "given", "label", "self_confidence"])
    if issues_csv is not None:
        path, index = issues_csv, class_index
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
            return (kept[~mask], kept[mask].assign(reason="label issue (cleanlab)"), None,
                    {"label_issues_dropped": len(new)})
        relabelled = pd.DataFrame({"id": kept.loc[mask, "id"], "given": kept.loc[mask, "label"], "label": new,
                                   "self_confidence": kept.loc[mask, "id"].map(issues["self_confidence"])})
        kept = kept.assign(label=kept["label"].where(~mask, new), y=kept["y"].where(~mask, new.map(index)).astype(int))
    counts = {"relabelled": len(relabelled)} if issues_csv is not None else {}
    return kept, kept.iloc[:0].assign(reason=""), relabelled, counts


def classes_without_images(kept: pd.DataFrame, classes: list[str], task: str, separator: str) -> list[str]:
    """The classes no kept training row holds (a multi_label row holds each of its tags)."""
    present = set(kept["label"]) if task != "multi_label" else {
        t for label in kept["label"] for t in split_tags(label.strip(), separator)}
    return [c for c in classes if c not in present]


def no_images_left(empty: list[str], kept: pd.DataFrame, dropped: pd.DataFrame, task: str, separator: str,
                   train_csv: Path, listed: Path) -> PipelineError:
    """The one-line error for a class (empty[0]) left without a training image, or for no training image at all:
    why its rows were dropped, the first one's line, and the file (`listed`) with all of them.

    A class without training images cannot be learnt; keeping it would train a head that never sees it and
    submit it by chance, and dropping it silently would change the submission's class set (sample_submission's
    probability columns). So the user decides: fix the images or remove the class's rows.
    """
    dropped = dropped[dropped.split == "train"]  # the competition's own rows explain its classes
    if kept.empty:
        first = dropped[dropped.split == "train"].iloc[0]
        return PipelineError(f"{train_csv}: every training image was dropped ({_reasons(dropped)}), e.g. line "
                             f"{first.line}: {first.reason}; fix the images (all listed in {listed})")
    holds = dropped.label.map(lambda v: empty[0] in split_tags(v.strip(), separator)
                              if task == "multi_label" else v == empty[0])
    first = dropped[holds].iloc[0]
    return PipelineError(f"{train_csv}: class '{empty[0]}' has no training image left after cleaning "
                         f"({_reasons(dropped[holds])}), e.g. line {first.line}: {first.reason}; "
                         f"fix its images or remove its rows (all listed in {listed})")


def _reasons(dropped: pd.DataFrame) -> str:
    kinds = np.where(dropped.reason.str.contains("cannot decode"), "unreadable", dropped.reason)
    return ", ".join(f"{n} {kind}" for kind, n in pd.Series(kinds).value_counts().items())


def duplicates_table(frame: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """duplicates.csv's rows: both sides of every pair (id, split, label, pHash, source), its kind, distance,
    similarity (embedding pairs) and group."""
    a, b = frame.iloc[pairs["a"]].reset_index(drop=True), frame.iloc[pairs["b"]].reset_index(drop=True)
    return pd.DataFrame({"id_a": a.id, "split_a": a.split, "label_a": a.label,
                         "id_b": b.id, "split_b": b.split, "label_b": b.label,
                         "kind": pairs["kind"], "distance": pairs["distance"],
                         "similarity": pairs["similarity"] if "similarity" in pairs else np.nan, "group": a.group,
                         "phash_a": a.phash.map(_hex), "phash_b": b.phash.map(_hex), "source_a": a.source,
                         "source_b": b.source})


def summary(n_train_rows: int, frame: pd.DataFrame, kept: pd.DataFrame, dropped: pd.DataFrame, pairs: pd.DataFrame,
            dup: pd.DataFrame, n_overrides: int, cfg: CleanConfig, n_set_aside: int = 0) -> dict:
    """The clean stage's counts of the competition's own rows (its stamp and its printed line); `n_set_aside`: the
    similar pairs not acted on (dedup.plausible_pairs)."""
    own, own_dropped = kept[kept.split == "train"], dropped[dropped.split != "extra"]
    train_test = (((dup.split_a == "train") & (dup.split_b == "test"))
                  | ((dup.split_a == "test") & (dup.split_b == "train")))
    reasons = own_dropped.reason
    out = {
        "train_rows": n_train_rows, "kept": len(own),
        "unreadable": int(reasons.str.contains("cannot decode").sum()),
        "flat": int((flat_training_rows(frame) & (frame.split == "train")).sum() + (reasons == FLAT).sum()),
        "flat_dropped": int((reasons == FLAT).sum()),
        "conflicts_dropped": int(reasons.str.startswith("label conflict").sum()),
        "duplicates_dropped": int((reasons == "exact duplicate of a kept image").sum()),
        "exact_pairs": int((pairs.kind == "exact").sum()), "near_pairs": int((pairs.kind == "near").sum()),
        "small_pairs": int((pairs.kind == "small").sum()), "sparse_pairs": int((pairs.kind == "sparse").sum()),
        "pairs_set_aside": n_set_aside,
        "train_test_pairs": int(train_test.sum()), "test_labels_known": n_overrides,
        "test_labels_transferred": n_overrides if cfg.transfer_test_labels else 0,
        "not_near_hashed": int(frame.phash.isna().sum()),
        "small_compared": int((frame.shift_grids.notna() & frame.small.fillna(False).astype(bool)).sum()),
        "sparse_compared": int((frame.shift_grids.notna() & ~frame.small.fillna(False).astype(bool)).sum()),
        "all_gray": bool(frame.gray.all()),
    }
    if cfg.embeddings:
        out["embedding_pairs"] = int((pairs.kind == "embedding").sum())
    return out


def extra_summary(n_extra: int, frame: pd.DataFrame, kept: pd.DataFrame, dropped: pd.DataFrame) -> dict:
    """Counts of the extra rows: read, kept, leaks found (and dropped), duplicates of training images dropped."""
    extra, reasons = frame[frame.split == "extra"], dropped.reason[dropped.split == "extra"]
    return {"extra_rows": n_extra, "extra_kept": int((kept.split == "extra").sum()),
            "extra_leaks": int(extra.group.isin(set(frame.group[frame.split == "test"])).sum()),
            "extra_leaks_dropped": int(reasons.str.startswith("extra image duplicates a test").sum()),
            "extra_duplicates_dropped": int(reasons.str.startswith("extra image duplicates a training").sum())}


def source_table(folders: list[str], kept: pd.DataFrame, dropped: pd.DataFrame) -> pd.DataFrame:
    """One row per extra folder: rows kept, and rows dropped per reason (the part before ':')."""
    gone = dropped[dropped.split == "extra"]
    table = pd.crosstab(gone.source, gone.reason.str.split(":").str[0]).reindex(folders, fill_value=0)
    table.insert(0, "kept", kept[kept.split == "extra"].source.value_counts().reindex(folders, fill_value=0))
    return table.rename_axis("folder").reset_index()


def _hex(code) -> str:
    return "" if not isinstance(code, list) else f"{code[0]:016x}"
