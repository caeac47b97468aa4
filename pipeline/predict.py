"""Predict stage: out-of-fold and test probabilities per backbone, with batched test-time augmentation.

All TTA views of a batch go through the network in one forward pass (stacked along the batch
axis) and are merged by the mean of probabilities. Each view and the merge are scored on the
out-of-fold rows and printed, so the user sees whether a view helps; the test set is only
predicted. Writes WORK/runs/<backbone>/{oof,test}.parquet with metadata (classes, folds hash, TTA)
and the stamp predict.json.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import train as train_stage
from .artifacts import atomic_write, fingerprint, is_done, read_json, write_stamp
from .cache import decoded_images
from .context import Context
from .errors import PipelineError
from .metrics import GREATER_IS_BETTER, is_better, score
from .models import build_model

VIEWS = {"identity": lambda x: x, "hflip": lambda x: x.flip(-1)}


@torch.no_grad()
def tta_proba(model, images: np.ndarray, views: list[str], norm: dict, device, batch_size: int) -> np.ndarray:
    """(n_views, N, n_classes) probabilities; every view of a batch in one forward pass."""
    model.eval()
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="predict", unit="batch", leave=False, disable=None):
        x = torch.from_numpy(np.array(images[start:start + batch_size])).permute(0, 3, 1, 2)
        x = train_stage.to_input(x, norm, device)
        stacked = torch.cat([VIEWS[v](x) for v in views])
        proba = model(stacked).float().softmax(1).view(len(views), len(x), -1)
        chunks.append(proba.cpu())
    return torch.cat(chunks, dim=1).numpy()


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
    model.load_state_dict(load_file(str(run_dir / "best.safetensors")))
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


def choose_views(per_view: np.ndarray, y: np.ndarray, metric: str, policy: str) -> list[int]:
    """Indices of the views to average, decided on OOF only.

    auto: start from the best single view and add a view only when the merged OOF score improves
    (greedy forward selection); all: every view.
    """
    if policy == "all":
        return list(range(len(per_view)))
    scores = [score(metric, y, p) for p in per_view]
    order = sorted(range(len(per_view)), key=lambda i: scores[i], reverse=GREATER_IS_BETTER[metric])
    chosen, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        candidate = score(metric, y, per_view[chosen + [i]].mean(0))
        if is_better(metric, candidate, best):
            chosen, best = chosen + [i], candidate
    return sorted(chosen)


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
    oof_parts, test_sum = [], None
    for k in folds:
        model, meta = load_checkpoint(out_dir / f"fold{k}", data["folds_hash"], classes)
        model.to(device)
        held = (frame["fold"] == k).to_numpy()
        proba = tta_proba(model, data["images"][held], views, meta["norm"], device, cfg.batch_size)
        oof_parts.append((frame[held], proba))
        test_images = decoded_images(ctx, test_paths, meta["image_size"], meta["in_chans"], "test")
        fold_test = tta_proba(model, test_images, views, meta["norm"], device, cfg.batch_size)
        test_sum = fold_test if test_sum is None else test_sum + fold_test
    rows = pd.concat([p[0] for p in oof_parts])
    per_view = np.concatenate([p[1] for p in oof_parts], axis=1)
    metric, y = ctx.cfg.competition.metric, rows["y"].to_numpy()
    chosen = choose_views(per_view, y, metric, cfg.tta_policy)
    merged = per_view[chosen].mean(0)
    table = {v: score(metric, y, per_view[i]) for i, v in enumerate(views)}
    table["mean of all views"] = score(metric, y, per_view.mean(0))
    table[f"kept ({'+'.join(views[i] for i in chosen)})"] = score(metric, y, merged)
    print(f"predict: {backbone} OOF {metric} by TTA view: " + ", ".join(f"{k} {v:.4f}" for k, v in table.items()))
    test_proba = test_sum[chosen].mean(0) / len(folds)
    meta = {"backbone": backbone, "classes": classes, "folds_hash": data["folds_hash"], "folds": folds, "tta": [views[i] for i in chosen],
            "tta_candidates": views, "metric": metric, "oof_score": score(metric, y, merged), "view_scores": table}
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
