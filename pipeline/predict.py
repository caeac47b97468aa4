"""Predict stage: out-of-fold and test probabilities per backbone, with batched test-time augmentation.

TTA views (pipeline/tta.py) of a batch go through the network together. Each view, all views
merged and the kept views merged are scored on the out-of-fold rows and printed, so the user sees
whether a view helps; `predict.tta_policy=auto` keeps the views that improve OOF. The test set is
only predicted, never used to choose. Writes WORK/runs/<backbone>/{oof,test}.parquet with metadata (classes, folds hash, TTA)
and the stamp predict.json.
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from . import train as train_stage
from .artifacts import atomic_write, fingerprint, is_done, read_json, write_stamp
from .cache import decoded_images
from .context import Context
from .errors import PipelineError
from .metrics import score
from .models import build_model
from .tta import choose_views, merge, tta_logits


def load_checkpoint(run_dir, folds_hash: str, classes: list[str]) -> tuple[torch.nn.Module, dict]:
    """Model and metadata of a finished fold run, refused when made for another split or class list."""
    meta = read_json(run_dir / "best.json")
    if meta is None or not (run_dir / "best.safetensors").exists():
        raise PipelineError(f"{run_dir}: no finished training run; run `make train` first")
    if meta["folds_hash"] != folds_hash:
        raise PipelineError(f"{run_dir}/best.json: trained on another split (folds hash {meta['folds_hash']} != {folds_hash}); rerun `make train`")
    if meta["classes"] != classes:
        raise PipelineError(f"{run_dir}/best.json: trained for classes {meta['classes']}, competition has {classes}; rerun `make train`")
    model = build_model(meta["backbone"], len(classes), meta["in_chans"], drop_rate=meta["drop_rate"])
    try:
        model.load_state_dict(load_file(str(run_dir / "best.safetensors")))
    except Exception as exc:  # noqa: BLE001 - truncated file, foreign tensors: the same fix
        raise PipelineError(f"{run_dir}/best.safetensors: unreadable or not this model's weights ({type(exc).__name__}); "
                            f"delete {run_dir} and rerun `make train`") from None
    return model, meta


def write_parquet(path, frame: pd.DataFrame, meta: dict) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"pipeline": json.dumps(meta).encode()})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_parquet_meta(path) -> dict:
    raw = pq.read_schema(path).metadata or {}
    return json.loads(raw.get(b"pipeline", b"{}"))


def prob_columns(classes: list[str]) -> list[str]:
    return [f"p_{c}" for c in classes]


def view_table(per_view: np.ndarray, chosen: list[int], views: list[str], y: np.ndarray, metric: str, how: str) -> dict:
    """OOF score of each view alone, of all views merged, and of the kept views merged."""
    table = {v: score(metric, y, merge(per_view[i:i + 1], how)) for i, v in enumerate(views)}
    table["all views"] = score(metric, y, merge(per_view, how))
    table[f"kept ({'+'.join(views[i] for i in chosen)})"] = score(metric, y, merge(per_view[chosen], how))
    return table


def predict_backbone(ctx: Context, backbone: str, data: dict, test_paths: list[str]) -> dict:
    cfg = ctx.cfg.predict
    out_dir = ctx.work_dir / "runs" / backbone
    folds = train_stage.folds_to_train(ctx.cfg.train.folds, data["n_splits"])
    run_fps = [read_json(out_dir / f"fold{k}" / "best.json")["fingerprint"] for k in folds]
    fp = fingerprint("predict", run_fps, cfg.model_dump())
    if is_done(out_dir / "predict.json", fp):
        print(f"predict: {backbone} up to date")
        return read_json(out_dir / "predict.json")
    device = train_stage.pick_device(ctx.cfg.train.device)
    frame, classes, views = data["frame"], data["classes"], cfg.tta
    oof_parts, test_logits = [], []
    ranges = {"degrees": cfg.tta_random_degrees, "scale": cfg.tta_random_scale, "shift": cfg.tta_random_shift}
    for k in folds:
        model, meta = load_checkpoint(out_dir / f"fold{k}", data["folds_hash"], classes)
        model.to(device)
        held = (frame["fold"] == k).to_numpy()
        to_input = partial(train_stage.to_input, norm=meta["norm"], device=device)
        held_logits = tta_logits(model, data["images"][held], views, to_input, cfg.batch_size, cfg.tta_seed, **ranges)
        oof_parts.append((frame[held], held_logits))
        test_images = decoded_images(ctx, test_paths, meta["image_size"], meta["in_chans"], "test")
        test_logits.append(tta_logits(model, test_images, views, to_input, cfg.batch_size, cfg.tta_seed, **ranges))
    rows = pd.concat([p[0] for p in oof_parts])
    per_view = np.concatenate([p[1] for p in oof_parts], axis=1)
    metric, y = ctx.cfg.competition.metric, rows["y"].to_numpy()
    chosen = choose_views(per_view, y, metric, cfg.tta_policy, cfg.tta_merge)
    merged = merge(per_view[chosen], cfg.tta_merge)
    table = view_table(per_view, chosen, views, y, metric, cfg.tta_merge)
    print(f"predict: {backbone} OOF {metric} by TTA view ({cfg.tta_merge} merge): " + ", ".join(f"{k} {v:.4f}" for k, v in table.items()))
    test_proba = np.mean([merge(lg[chosen], cfg.tta_merge) for lg in test_logits], axis=0)  # mean over fold models
    meta = {"backbone": backbone, "classes": classes, "folds_hash": data["folds_hash"], "folds": folds, "tta": [views[i] for i in chosen],
            "tta_candidates": views, "tta_merge": cfg.tta_merge, "metric": metric, "oof_score": score(metric, y, merged), "view_scores": table}
    oof = pd.DataFrame(merged, columns=prob_columns(classes))
    oof.insert(0, "id", rows["id"].to_numpy())
    oof.insert(1, "fold", rows["fold"].to_numpy())
    oof.insert(2, "label", rows["label"].to_numpy())
    oof.insert(3, "y", rows["y"].to_numpy())
    test = pd.DataFrame(test_proba, columns=prob_columns(classes))
    test.insert(0, "id", ctx.competition.test["id"].to_numpy())
    write_parquet(out_dir / "oof.parquet", oof, meta)
    write_parquet(out_dir / "test.parquet", test, meta)
    write_stamp(out_dir / "predict.json", fp, **meta)
    return meta


def run(ctx: Context) -> dict:
    train_stage.run(ctx)
    data = train_stage.load_training_data(ctx)
    test_paths = list(ctx.competition.test["path"])
    return {b: predict_backbone(ctx, b, data, test_paths)["oof_score"] for b in ctx.cfg.model.backbones}
