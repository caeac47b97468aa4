"""Prediction files: the one OOF/test schema every model writes and the ensemble reads.

`WORK/runs/<model>/{oof,test}.parquet` hold an id column (OOF files also fold, label, y) and one
probability column `p_<class>` per class; the file's schema metadata (key `pipeline`) holds the
classes, folds hash and how the predictions were made, so a reader can check them before use.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.artifacts import atomic_write
from pipeline.core.errors import PipelineError
from pipeline.scoring import tasks

log = logging.getLogger(__name__)


def write_parquet(path, frame: pd.DataFrame, meta: dict) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"pipeline": json.dumps(meta).encode()})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_parquet_meta(path) -> dict:
    raw = pq.read_schema(path).metadata or {}
    return json.loads(raw.get(b"pipeline", b"{}"))


def prob_columns(classes: list[str]) -> list[str]:
    return [f"p_{c}" for c in classes]


def find_predictions(work_dir: Path, configured: list[str], include_other: bool, folds_hash: str,
                     classes: list[str]) -> dict[str, tuple[pd.DataFrame, pd.DataFrame, Path]]:
    """name -> (OOF frame sorted by id, test frame, folder) of every usable pair of prediction files under
    `work_dir`: the configured run folders (`runs/<experiment>`, which must be usable) first, then, with
    `include_other`, any other folder holding both files."""
    # the blend's own files, and the distilled students (they learnt from the blend: blending them back in would
    # make their teacher depend on them), are not models to blend
    found = sorted(str(p.parent.relative_to(work_dir)) for p in work_dir.rglob("oof.parquet")
                   if not {"ensemble", "distill"} & set(p.relative_to(work_dir).parts))
    if not include_other:
        found = [f for f in found if f in configured]
    models, reference = {}, None
    for rel in configured + [f for f in found if f not in configured]:
        folder = work_dir / rel
        meta = read_parquet_meta(folder / "oof.parquet")
        name = rel.removeprefix("runs/")
        if (meta.get("folds_hash") != folds_hash or meta.get("classes") != classes
                or not (folder / "test.parquet").exists()):
            if rel in configured:
                raise PipelineError(f"{folder}/oof.parquet: made on another split or class list; rerun `make predict`")
            log.info(f"ensemble: skipped {rel}: made on another split or class list (or no test.parquet)")
            continue
        oof = pd.read_parquet(folder / "oof.parquet").sort_values("id", kind="stable").reset_index(drop=True)
        if reference is not None and not oof["id"].equals(reference):
            log.info(f"ensemble: skipped {rel}: its OOF rows differ from {configured[0]}'s (trained on other folds?)")
            continue
        reference = oof["id"] if reference is None else reference
        models[name] = (oof, pd.read_parquet(folder / "test.parquet"), folder)
    return models


def prediction_arrays(models: dict[str, tuple], classes: list[str], task: str = "single_label"
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(OOF predictions (n_models, n_rows, n_columns), test predictions in the first model's test order, test ids)
    of find_predictions' models."""
    cols = tasks.columns(task, classes)
    first_test = next(iter(models.values()))[1]
    P = np.stack([m[0][cols].to_numpy(np.float64) for m in models.values()])
    T = np.stack([m[1].set_index("id").loc[first_test["id"], cols].to_numpy(np.float64) for m in models.values()])
    return P, T, first_test["id"].to_numpy()
