"""Prediction files: the one OOF/test schema every model writes and the ensemble reads.

`WORK/runs/<model>/{oof,test}.parquet` hold an id column (OOF files also fold, label, y) and one
probability column `p_<class>` per class; the file's schema metadata (key `pipeline`) holds the
classes, folds hash and how the predictions were made, so a reader can check them before use.
"""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.artifacts import atomic_write


def write_parquet(path, frame: pd.DataFrame, meta: dict) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"pipeline": json.dumps(meta).encode()})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_parquet_meta(path) -> dict:
    raw = pq.read_schema(path).metadata or {}
    return json.loads(raw.get(b"pipeline", b"{}"))


def prob_columns(classes: list[str]) -> list[str]:
    return [f"p_{c}" for c in classes]
