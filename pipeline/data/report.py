"""report/clean.html: the clean stage's counts and every duplicate group as thumbnails; report/labels.html: the
labels stage's flagged rows.

One self-contained file (thumbnails inlined as base64 PNG) that opens in any browser; groups whose labels
disagree, and groups where an extra image (competition.extra) duplicates a test image, come first, outlined in
red. Flat (single-colour) training images are listed with their labels. Groups joined by embedding pairs
(clean.embeddings) list those pairs with their cosine similarity. Extra images are captioned with their folder;
a table per extra folder counts its kept and dropped rows, and the dropped extra rows are listed with their
reason.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import pandas as pd
from PIL import Image

from pipeline.core.artifacts import write_text
from pipeline.core.errors import PipelineError
from pipeline.data.images import load_image

STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}.group{display:flex;gap:8px;margin:8px 0;padding:6px;
border:2px solid #ddd;border-radius:6px;align-items:flex-start}.conflict{border-color:#d33;background:#fff3f3}
.item{font-size:11px;max-width:110px;word-break:break-all}.item img{display:block;image-rendering:pixelated;
width:96px;height:96px;object-fit:contain;background:#eee}.tag{color:#d33;font-weight:bold}
.note{font-size:11px;color:#555;max-width:120px}"""


def thumbnail(path: str, size: int = 96) -> str:
    """A data: URI of a small PNG of the image (or an empty string when it cannot be decoded)."""
    try:
        arr = load_image(path)
    except PipelineError:
        return ""
    im = Image.fromarray(arr)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _caption(row) -> str:
    if row.split == "test":
        return "test"
    label = f"label {html.escape(str(row.label))}"
    return label if row.split == "train" else f"extra, {label}<br>from {html.escape(str(row.source))}"


def _group_html(members: pd.DataFrame, conflict: bool, note: str = "") -> str:
    items = []
    for row in members.itertuples():
        items.append(f'<div class="item"><img src="{thumbnail(row.path)}" alt=""><b>{html.escape(str(row.id))}</b>'
                     f"<br>{_caption(row)}</div>")
    tags = (["labels disagree"] if conflict else []) + (["extra image duplicates a test image (leak)"]
                                                        if {"extra", "test"} <= set(members["split"]) else [])
    tag = "".join(f'<div class="tag">{t}</div>' for t in tags) + (f'<div class="note">{note}</div>' if note else "")
    return f'<div class="group{" conflict" if tags else ""}">{tag}{"".join(items)}</div>'


def _embedding_notes(pairs: pd.DataFrame) -> dict:
    """Per group joined by embedding pairs (clean.embeddings): their count and cosine similarities."""
    if "kind" not in pairs or not (pairs["kind"] == "embedding").any():
        return {}
    emb = pairs[pairs["kind"] == "embedding"]
    return {g: f"embedding pair{'s' if len(p) > 1 else ''}: "
               + ", ".join(f"{html.escape(str(a))}~{html.escape(str(b))} similarity {s:.3f}"
                           for a, b, s in zip(p["id_a"], p["id_b"], p["similarity"], strict=True))
            for g, p in emb.groupby("group")}


def _table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><tr>{head}</tr>{rows}</table>"


def _extra_html(sources: pd.DataFrame | None, dropped: pd.DataFrame, max_rows: int) -> str:
    """Per extra folder: rows kept and dropped by reason; then the dropped extra rows themselves."""
    if sources is None or sources.empty:
        return ""
    gone = dropped[dropped["split"] == "extra"][["source", "id", "label", "reason"]]
    more = f"<p>{len(gone) - max_rows} more in dropped.csv.</p>" if len(gone) > max_rows else ""
    return (f"<h2>Extra data (training rows only)</h2>{_table(sources)}"
            f"<h3>Dropped extra rows ({len(gone)})</h3>{_table(gone.head(max_rows))}{more}")


def _flat_html(frame: pd.DataFrame, dropped: pd.DataFrame, note: str | None) -> str:
    """The flat training images (kept and dropped): the note, their labels with counts, a thumbnail per label."""
    if note is None:
        return ""
    rows = pd.concat([frame, dropped])
    flat = rows[rows["flat"].fillna(False).astype(bool) & rows["error"].isna() & (rows["split"] == "train")]
    counts = flat["label"].value_counts().rename_axis("label").reset_index(name="flat images")
    examples = _group_html(flat.drop_duplicates("label").head(20), conflict=False)
    return f"<h2>Flat images</h2><p>{html.escape(note.removeprefix('clean: '))}</p>{_table(counts)}{examples}"


def write_clean_report(path: Path, frame: pd.DataFrame, pairs: pd.DataFrame, dropped: pd.DataFrame, summary: dict,
                       max_groups: int, sources: pd.DataFrame | None = None, flat_note: str | None = None) -> Path:
    """`sources`: one row per extra folder (its counts), or None without extra data; `flat_note`: the line on the
    flat training images (quality.flat_note), shown above their label counts and one thumbnail per label."""
    sizes = frame.groupby("group").size()
    multi = frame[frame["group"].isin(sizes[sizes > 1].index)]
    train_labels = multi[multi["split"] != "test"].groupby("group")["label"].nunique()
    conflict = set(train_labels[train_labels > 1].index)
    splits = multi.groupby("group")["split"].agg(set)
    leak = set(splits[splits.map(lambda s: {"extra", "test"} <= s)].index)
    order = sorted(multi["group"].unique(), key=lambda g: (g not in conflict and g not in leak, -sizes[g], g))
    counts = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in summary.items())
    reasons = dropped["reason"].str.split(":").str[0].value_counts() if len(dropped) else pd.Series(dtype=int)
    drop_rows = "".join(f"<tr><td>{html.escape(str(r))}</td><td>{n}</td></tr>" for r, n in reasons.items())
    notes = _embedding_notes(pairs)
    groups = "".join(_group_html(multi[multi["group"] == g], g in conflict, notes.get(g, ""))
                     for g in order[:max_groups])
    more = (f"<p>{len(order) - max_groups} more groups not shown (clean.report_groups).</p>"
            if len(order) > max_groups else "")
    body = (f"<h1>Clean report</h1><table>{counts}</table><h2>Dropped</h2>"
            f"<table><tr><th>reason</th><th>rows</th></tr>{drop_rows}</table>"
            f"{_flat_html(frame, dropped, flat_note)}{_extra_html(sources, dropped, max_groups)}"
            f"<h2>Duplicate groups ({len(order)}; {len(conflict)} with disagreeing labels; {len(pairs)} pairs)</h2>"
            f"{groups}{more}")
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>Clean report</title><style>{STYLE}</style></head>'
            f'<body>{body}</body></html>')
    return write_text(path, page)


def write_labels_report(path: Path, table: pd.DataFrame, n_rows: int, max_items: int) -> Path:
    """report/labels.html: the flagged rows as thumbnails, least self-confident first, given vs suggested label."""
    items = []
    for row in table.head(max_items).itertuples():
        group = f"<br>group {html.escape(str(row.group))}" if hasattr(row, "group") else ""
        items.append(f'<div class="item"><img src="{thumbnail(row.path)}" alt="">'
                     f"<b>{html.escape(str(row.id))}</b><br>given {html.escape(str(row.given_label))}"
                     f'<br><span class="tag">suggested {html.escape(str(row.suggested_label))}</span>'
                     f"<br>self-confidence {row.self_confidence:.3f}{group}</div>")
    more = (f"<p>{len(table) - max_items} more in label_issues.csv (clean.report_groups).</p>"
            if len(table) > max_items else "")
    body = (f"<h1>Label issues</h1><p>{len(table)} of {n_rows} training rows flagged by cleanlab's confident "
            "learning on the chosen blend's out-of-fold probabilities, least confident in the given label first. "
            "The group is the duplicate group the folds keep together.</p>"
            f'<div class="group" style="flex-wrap:wrap">{"".join(items)}</div>{more}')
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>Label issues</title>'
            f"<style>{STYLE}</style></head><body>{body}</body></html>")
    return write_text(path, page)
