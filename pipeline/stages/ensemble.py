"""Ensemble stage: blend every model's out-of-fold predictions, score honestly, write the submission.

Reads only prediction files of one schema: WORK/runs/<experiment>/{oof,test}.parquet and any other
pair of such files under WORK (an AutoGluon baseline, a model trained elsewhere). Files made on
another split or class list are skipped with a message. Every single model and every blend
(pipeline/scoring/blend.py) goes on the leaderboard with its in-sample and honest (nested-CV) score
(pipeline/scoring/nested.py); the chosen blend is the best honest one unless `ensemble.method` names another. Writes
WORK/ensemble/{leaderboard.csv, weights.json, oof.parquet, test.parquet} and
submissions/<competition>.csv, and ends with the experiments table (WORK/experiments.csv).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from pipeline.context import Context
from pipeline.core import experiments
from pipeline.core.artifacts import file_digest, fingerprint, is_done, read_json, write_csv, write_stamp
from pipeline.core.config import config_hash
from pipeline.core.errors import PipelineError
from pipeline.scoring import blend, nested, submission, tasks
from pipeline.scoring.blend import BlendSettings
from pipeline.scoring.predictions import prediction_arrays, read_parquet_meta, write_parquet

log = logging.getLogger(__name__)


def _print_board(board: pd.DataFrame, metric: str, n_rows: int, n_folds: int, chosen: str) -> None:
    log.info(f"ensemble: OOF {metric} on {n_rows} rows, {n_folds} folds "
          "(honest = fitted blends and the stack scored by nested CV)")
    shown = board.assign(chosen=np.where(board["model"] == chosen, "<-", ""))
    log.info(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def inputs_key(ctx: Context, models: dict, folds_meta: dict) -> str:
    """What ensemble reads: every model's OOF and test files (in blending order), the split and classes they
    must match, the known test labels when transferred, and what the submission is built and checked against
    (test ids, sample_submission.csv, id and label columns)."""
    comp, sample = ctx.competition, ctx.data_dir / ctx.cfg.competition.sample_submission_csv
    overrides = ctx.work_dir / "test_label_overrides.csv"
    transfer = ctx.cfg.clean.transfer_test_labels and overrides.exists()
    files = [(n, file_digest(m[2] / "oof.parquet"), file_digest(m[2] / "test.parquet")) for n, m in models.items()]
    return fingerprint("ensemble", files, folds_meta["folds_hash"], folds_meta["classes"],
                       ctx.cfg.ensemble.model_dump(), ctx.cfg.competition.metric,
                       file_digest(overrides) if transfer else None, file_digest(sample) if sample.is_file() else None,
                       comp.test["id"].tolist(), comp.id_column, comp.label_column, comp.classes)


def run(ctx: Context) -> dict:
    """Blend every model's predictions and write the submission (pipeline/orchestrate.py runs predict first)."""
    comp, cfg = ctx.competition, ctx.cfg.ensemble
    folds_meta = read_json(ctx.work_dir / "folds.json", "run `make folds`")
    models = ctx.find_predictions(folds_meta["folds_hash"], folds_meta["classes"])
    overrides = ctx.work_dir / "test_label_overrides.csv"
    fp = inputs_key(ctx, models, folds_meta)
    stamp, sub_path = ctx.work_dir / "ensemble" / "weights.json", ctx.submissions_dir / f"{comp.name}.csv"
    if is_done(stamp, fp, [sub_path]):
        meta = read_json(stamp, "rerun `make ensemble`")
        log.info(f"ensemble: up to date; chosen {meta['chosen']}, honest CV {meta['metric']} {meta['honest_score']:.4f}"
              f"{_auto_pick_nested_text(meta)}; submission {sub_path}")
        _experiments_table(ctx, meta.get("leaderboard", []))
        return meta
    names, metric = list(models), ctx.cfg.competition.metric
    task, sep = ctx.cfg.competition.task, ctx.cfg.competition.label_separator
    P, T, test_ids = prediction_arrays(models, folds_meta["classes"], task)
    rows = next(iter(models.values()))[0]
    y, folds = tasks.truth(task, rows, folds_meta["classes"], sep), rows["fold"].to_numpy()
    settings = BlendSettings(metric, cfg.objective, cfg.caruana_rounds, cfg.stack_c, cfg.thresholds,
                             len(folds_meta["classes"]) if task == "ordinal" else None, cfg.stack_lightgbm)
    if cfg.stack_lightgbm and not blend.lightgbm_available():
        log.info("ensemble: ensemble.stack_lightgbm=true but lightgbm does not import; no LightGBM stack "
              "(pip install lightgbm)")
    board_rows = nested.leaderboard(P, y, folds, names, settings)
    try:
        chosen = nested.chosen_row(board_rows, metric, cfg.method)
    except KeyError:
        raise PipelineError(f"ensemble.method={cfg.method}: no such model or blend; "
                            f"choose from {[r.model for r in board_rows]}") from None
    board = pd.DataFrame([{**r.summary(), "weights": json.dumps(r.weights)} for r in board_rows])
    write_csv(ctx.work_dir / "ensemble" / "leaderboard.csv", board)
    _print_board(board.drop(columns=["how"]), metric, len(y), len(np.unique(folds)), chosen.model)
    auto = auto_pick_honesty(P, y, folds, names, settings, cfg.method, chosen, board_rows)
    auto["tta_optimism"] = tta_optimism(models, metric)
    test_proba = chosen.predict(T)  # weights or stack fitted on all OOF rows
    _write_blend_predictions(ctx, rows, chosen, test_ids, test_proba, folds_meta, task)
    cuts = chosen.thresholds
    if cuts is not None:
        log.info(f"ensemble: {metric} thresholds of {chosen.model}, tuned on its OOF rows (nested in its honest "
              f"score): {np.round(np.atleast_1d(cuts), 3).tolist()}")
    frame = submission.build(comp, test_ids, test_proba, submission.output_kind(comp, cfg.output), cuts)
    if ctx.cfg.clean.transfer_test_labels and overrides.exists():
        frame, n = submission.apply_overrides(frame, comp, overrides)
        log.info(f"ensemble: clean.transfer_test_labels=true: {n} test rows take the label of their training duplicate "
              f"({overrides})")
    manifest = {"models": names, "chosen": chosen.model, "weights": chosen.weights, "how": chosen.how,
                "metric": metric, "cv_score": chosen.cv_score, "honest_score": chosen.honest_score, **auto,
                "thresholds": None if cuts is None else np.atleast_1d(cuts).tolist(),
                "folds_hash": folds_meta["folds_hash"],
                "config_hash": config_hash(ctx.cfg),
                "leaderboard": [{"model": r.model, "cv_score": r.cv_score, "honest_score": r.honest_score}
                                for r in board_rows]}
    path = submission.write(frame, comp, ctx.submissions_dir, manifest)
    write_stamp(stamp, fp, **manifest, submission=str(path))
    log.info(f"ensemble: chosen {chosen.model}: honest CV {metric} {chosen.honest_score:.4f}"
          f"{_auto_pick_nested_text(auto)}; submission written to {path}")
    _experiments_table(ctx, manifest["leaderboard"])
    return {**manifest, "submission": str(path)}


def _auto_pick_nested_text(auto: dict) -> str:
    """The honest figure of `auto` itself beside the chosen row's: that row was picked for its honest score,
    so the pick's own nested score (picked on the other folds) is the number to quote."""
    if auto.get("auto_pick_nested_score") is not None:
        return f" (the auto pick itself, nested: {auto['auto_pick_nested_score']:.4f})"
    if auto.get("auto_pick_optimism") is not None:
        return f" (selection-optimistic by about {auto['auto_pick_optimism']:.4f})"
    return ""


def _experiments_table(ctx: Context, leaderboard: list[dict]) -> None:
    """WORK/experiments.csv with each experiment's honest score (its single-model row), printed."""
    honest: dict[str, float] = {}
    for row in leaderboard:  # single-model rows come first; a blend of the same name must not replace one
        honest.setdefault(row["model"], row["honest_score"])
    frame = ctx.write_experiments_table(honest)
    log.info(f"ensemble: experiments ({ctx.work_dir / 'experiments.csv'})\n"
          + experiments.format_table(frame, ctx.cfg.competition.metric))


def auto_pick_honesty(P: np.ndarray, y: np.ndarray, folds: np.ndarray, names: list[str], settings: BlendSettings,
                      method: str, chosen: nested.BoardRow, board_rows: list[nested.BoardRow]) -> dict:
    """The honest score of the `auto` pick (nested.nested_auto_pick), printed and recorded in weights.json.

    The chosen row's honest_score is the best of every row's honest score, so under `auto` it is
    selection-optimistic; auto_pick_nested_score picks on the other folds and scores the held-out one.
    Under 3 folds it cannot be nested (the other fold would have to nest the fitted rows again): the
    figure is then labelled selection-optimistic, off by about the best minus the median honest score
    when the rows are equally good and differ by noise only (the expected excess of a maximum)."""
    none = {"auto_pick_nested_score": None, "auto_picks_by_fold": None, "auto_pick_optimism": None}
    if method != "auto":
        return none
    result = nested.nested_auto_pick(P, y, folds, names, settings)
    if result is None:
        spread = abs(chosen.honest_score - float(np.median([r.honest_score for r in board_rows])))
        log.info(f"ensemble: auto pick, nested: needs 3 folds; its honest score is selection-optimistic, "
              f"by about {spread:.4f} (best minus median honest score) if the rows differ by noise only")
        return {**none, "auto_pick_optimism": spread}
    picks = ", ".join(f"fold {k}: {m}" for k, m in result.picks.items())
    log.info(f"ensemble: auto pick, nested: {result.score:.4f} (picked on the other folds: {picks})")
    return {**none, "auto_pick_nested_score": result.score,
            "auto_picks_by_fold": {str(k): m for k, m in result.picks.items()}}


def tta_optimism(models: dict, metric: str) -> dict[str, float]:
    """How much each model's OOF score gains from its TTA views being chosen on all OOF rows (predict's
    oof_score minus its nested oof_score_nested, in the metric's better direction), printed as what every
    leaderboard row built on that model's OOF may be selection-optimistic by. Models without the two
    figures (AutoGluon, files from elsewhere) chose nothing on OOF here and are left out."""
    gaps = {}
    for name, (_, _, folder) in models.items():
        meta = read_parquet_meta(folder / "oof.parquet")
        if meta.get("oof_score_nested") is not None and meta.get("oof_score") is not None:
            gap = meta["oof_score"] - meta["oof_score_nested"]
            gaps[name] = gap if tasks.greater_is_better(metric) else -gap
    if gaps:
        log.info("ensemble: TTA views were chosen on each model's OOF rows; its rows here are selection-optimistic "
              "by about the nested TTA gap: " + ", ".join(f"{n} {g:+.4f}" for n, g in gaps.items()))
    return gaps


def _write_blend_predictions(ctx: Context, rows: pd.DataFrame, chosen: nested.BoardRow, test_ids, test_proba,
                             folds_meta: dict, task: str = "single_label") -> None:
    """The chosen blend's honest OOF and its test probabilities, in the per-model schema (for notebooks)."""
    cols = tasks.columns(task, folds_meta["classes"])
    meta = {"model": chosen.model, "classes": folds_meta["classes"], "folds_hash": folds_meta["folds_hash"]}
    oof = pd.concat([rows[["id", "fold", "label", "y"]], pd.DataFrame(chosen.oof, columns=cols)], axis=1)
    test = pd.concat([pd.DataFrame({"id": test_ids}), pd.DataFrame(test_proba, columns=cols)], axis=1)
    write_parquet(ctx.work_dir / "ensemble" / "oof.parquet", oof, meta)
    write_parquet(ctx.work_dir / "ensemble" / "test.parquet", test, meta)
