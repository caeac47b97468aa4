"""The strict CSV reader every competition file goes through (train, test, sample submission, extra folders,
detection tables, submissions to score).

All cells come back as strings (ids and labels are written back exactly as read), and each row keeps the line
an editor shows (header = line 1, blank lines and quoted line breaks counted), so every error names the file and
line. The standard library's csv module reports where a record starts; pandas does not.
"""

from __future__ import annotations

import codecs
import csv
import io
from pathlib import Path

import pandas as pd

from pipeline.core.errors import PipelineError

DELIMITERS = {";": "semicolons", "\t": "tabs", "|": "vertical bars"}

def _decode(raw: bytes, path: Path) -> str:
    """UTF-8 (with or without BOM) or UTF-16 with a BOM; anything else is a one-line error with the line."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise PipelineError(f"{path}: starts with a UTF-16 mark but is not UTF-16 text; save it as UTF-8") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise PipelineError(f"{path} line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8 "
                            "(e.g. iconv -f latin1 -t utf-8)") from None


def _rows(text: str, path: Path) -> tuple[list[list[str]], list[int]]:
    """CSV records and the file line each starts on; blank lines are skipped, like pandas does."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True, skipinitialspace=True)
    rows, lines, end = [], [], 0
    try:
        for row in reader:
            start, end = end + 1, reader.line_num
            if row and row != [""]:
                rows.append(row)
                lines.append(start)
    except csv.Error as exc:
        raise PipelineError(f"{path} line {end + 1}: badly quoted field ({exc}); quote whole fields with \" "
                            "and double any \" inside them") from None
    return rows, lines


def _header(row: list[str], path: Path, line: int) -> list[str]:
    """Column names: a delimiter other than ',' and repeated names are errors; empty names as pandas gives them."""
    if len(row) == 1:
        for sep, name in DELIMITERS.items():
            if sep in row[0]:
                raise PipelineError(f"{path} line {line}: columns are separated by {name} ('{row[0]}'); "
                                    "competition CSVs are comma-separated: save the file with commas")
    names = [name or f"Unnamed: {i}" for i, name in enumerate(row)]
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        raise PipelineError(f"{path} line {line}: column '{sorted(seen)[0]}' appears twice in the header; rename one")
    return names


def read_table(path: Path) -> pd.DataFrame:
    """All cells as strings (ids and labels are written back exactly as read); frame.attrs['lines'] holds each
    row's line in the file (header = line 1), so errors name the line an editor shows, blank lines included."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{path}: is a folder, not a CSV file")
    if not path.is_file():
        raise PipelineError(f"{path}: file not found; the competition folder must contain it "
                            "(see docs/competition.md)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read the file ({exc.strerror}); check its permissions") from None
    rows, lines = _rows(_decode(raw, path), path)
    if not rows:
        raise PipelineError(f"{path}: file is empty; it needs a header row and one row per image")
    columns = _header(rows[0], path, lines[0])
    body = []
    for row, line in zip(rows[1:], lines[1:], strict=True):
        if len(row) > len(columns):
            raise PipelineError(f"{path} line {line}: {len(row)} fields but the header has {len(columns)}; "
                                "quote values that contain commas")
        body.append(row + [""] * (len(columns) - len(row)))  # short rows end in empty cells, as in pandas
    frame = pd.DataFrame(body, columns=columns, dtype=str) if body else pd.DataFrame(columns=columns, dtype=str)
    frame.attrs["lines"] = lines[1:]
    return frame


def line_of(frame: pd.DataFrame, i: int) -> int:
    """The file line of row i of a frame read by read_table (header = line 1)."""
    lines = frame.attrs.get("lines")
    return int(lines[i]) if lines is not None else i + 2
