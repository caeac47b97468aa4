"""Ensemble stage: blend backbones on their out-of-fold predictions and write the submission.

Reads only the per-backbone OOF/test parquet files (same schema for every model), refuses files
made on another split or class list, scores each model and the blend on OOF (the CV score), writes
WORK/ensemble/{leaderboard.csv, weights.json} and submissions/<competition>.csv.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import predict as predict_stage
from . import submission
from .artifacts import file_digest, fingerprint, is_done, read_json, write_csv, write_stamp
from .context import Context
from .errors import PipelineError
from .metrics import score


def load_predictions(ctx: Context, backbones: list[str]) -> tuple[pd.DataFrame, dict, dict]:
    """OOF frame (ids, folds, labels), {backbone: oof proba}, {backbone: test proba}; all aligned."""
    base, oof, test, ref = None, {}, {}, None
    for name in backbones:
        run_dir = ctx.work_dir / "runs" / name
        meta = predict_stage.read_parquet_meta(run_dir / "oof.parquet")
        if ref is None:
            ref = meta
        elif (meta["folds_hash"], meta["classes"]) != (ref["folds_hash"], ref["classes"]):
            raise PipelineError(f"{run_dir}/oof.parquet: made on another split or class list than {backbones[0]}; rerun `make predict`")
        cols = predict_stage.prob_columns(meta["classes"])
        frame = pd.read_parquet(run_dir / "oof.parquet").sort_values("id", kind="stable").reset_index(drop=True)
        if base is None:
            base = frame[["id", "fold", "label", "y"]]
        elif not frame["id"].equals(base["id"]):
            raise PipelineError(f"{run_dir}/oof.parquet: OOF rows differ from {backbones[0]}'s; train both on the same folds")
        oof[name] = frame[cols].to_numpy()
        test_frame = pd.read_parquet(run_dir / "test.parquet")
        test[name] = test_frame[cols].to_numpy()
        test_ids = test_frame["id"].to_numpy()
    return base, oof, {"proba": test, "ids": test_ids, "classes": ref["classes"]}


def run(ctx: Context) -> dict:
    predict_stage.run(ctx)
    backbones = ctx.cfg.model.backbones
    comp = ctx.competition
    stamps = [read_json(ctx.work_dir / "runs" / b / "predict.json")["fingerprint"] for b in backbones]
    sample = ctx.data_dir / ctx.cfg.competition.sample_submission_csv
    fp = fingerprint("ensemble", stamps, ctx.cfg.ensemble.model_dump(), file_digest(sample) if sample.is_file() else None)
    stamp = ctx.work_dir / "ensemble" / "weights.json"
    sub_path = ctx.submissions_dir / f"{comp.name}.csv"
    if is_done(stamp, fp) and sub_path.exists():
        meta = read_json(stamp)
        print(f"ensemble: up to date; CV {meta['metric']} {meta['cv_score']:.4f}; submission {sub_path}")
        return meta
    rows, oof, test = load_predictions(ctx, backbones)
    metric, y = ctx.cfg.competition.metric, rows["y"].to_numpy()
    weights = {b: 1.0 / len(backbones) for b in backbones}
    blend_oof = sum(w * oof[b] for b, w in weights.items())
    board = [{"model": b, "kind": "single", "cv_score": score(metric, y, oof[b])} for b in backbones]
    board.append({"model": "+".join(backbones), "kind": "mean", "cv_score": score(metric, y, blend_oof)})
    leaderboard = pd.DataFrame(board)
    write_csv(ctx.work_dir / "ensemble" / "leaderboard.csv", leaderboard)
    print(f"ensemble: OOF {metric} ({len(y)} rows, {rows['fold'].nunique()} folds)")
    print(leaderboard.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    blend_test = sum(w * test["proba"][b] for b, w in weights.items())
    kind = submission.output_kind(comp, ctx.cfg.ensemble.output)
    frame = submission.build(comp, test["ids"], np.asarray(blend_test), kind)
    cv = float(leaderboard["cv_score"].iloc[-1])
    manifest = {"models": backbones, "weights": weights, "metric": metric, "cv_score": cv, "method": ctx.cfg.ensemble.method,
                "folds_hash": read_json(ctx.work_dir / "folds.json")["folds_hash"], "config_fingerprint": fp}
    path = submission.write(frame, comp, ctx.submissions_dir, manifest)
    write_stamp(stamp, fp, **manifest, submission=str(path))
    print(f"ensemble: CV {metric} {cv:.4f}; submission written to {path}")
    return {**manifest, "submission": str(path)}
