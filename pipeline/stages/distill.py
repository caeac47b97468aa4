"""Distill stage: one fast student trained on the chosen ensemble's probabilities, leak-free (training/distill.py).

For each fold k: the fold-k models of the chosen blend's members predict the student's training rows over their
kept TTA views, the blend (refitted on the other folds' OOF rows) turns them into soft targets, and the fold-k
student learns them (train_fold with per-fold soft targets, the machinery of soft pseudo-labels); with
`distill.test_images` it also learns the same teachers' blended probabilities of every test image (fold-k pseudo
rows: no label, so no leak), targets the teachers never trained on. With `distill.init=teacher` it starts from the
fold-k weights of its best-scoring same-backbone teacher (trained on the same rows). With
`distill.hard_baseline` the same backbone is trained on the hard labels too. Both are predicted like any experiment
(OOF and test parquet files, honest OOF scores) under WORK/distill/runs/<name>/: outside WORK/runs, so the ensemble
does not blend the student back into the teacher it learns from (its targets would then depend on itself). The
table printed at the end compares the ensemble, the student and the hard-label model: honest score and
milliseconds per image on this machine's device (up to 1,024 decoded test images, every fold model and kept view
each predicts with, the rows timed interleaved; the student deployed as one fold model, and as the mean of its fold
models). Writes
WORK/distill/{distill.json, table.csv}.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.context import Context
from pipeline.core import experiments
from pipeline.core.artifacts import content_key, file_digest, fingerprint, is_done, read_json, write_csv, write_stamp
from pipeline.core.config import PredictConfig
from pipeline.core.errors import PipelineError
from pipeline.export.bundle import blend_spec, used_models
from pipeline.scoring import tasks
from pipeline.scoring.blend import BlendSettings, refit_chosen
from pipeline.scoring.metrics import score
from pipeline.scoring.predictions import prediction_arrays, prob_columns
from pipeline.training import runtime
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.distill import fold_targets, ms_per_image, teacher_proba, with_labels
from pipeline.training.fold import folds_to_train, train_fold, training_rows
from pipeline.training.inference import predict_experiment, view_logits

log = logging.getLogger(__name__)


def check(ctx: Context) -> None:
    task = ctx.cfg.competition.task
    if task not in ("single_label", "auto"):
        raise PipelineError(f"make distill: soft targets are class probabilities, for single_label tasks only; this "
                            f"one is {task}")


def _student(ctx: Context, by_name: dict, used: list[str], hard: bool) -> experiments.Experiment:
    """The student (or its hard-label twin) as an experiment: distill.backbone (default the used member with the
    fewest parameters), distill.image_size and epochs, distill.tta views all kept."""
    cfg, d = ctx.cfg, ctx.cfg.distill
    backbone = d.backbone
    if backbone is None:
        sizes = {}
        for name in used:
            meta = read_json(ctx.work_dir / "runs" / name / "fold0" / "best.json", "run `make train`") \
                if (ctx.work_dir / "runs" / name / "fold0" / "best.json").is_file() else None
            sizes[name] = meta["n_params"] if meta else float("inf")
        backbone = by_name[min(used, key=lambda n: sizes[n])].backbone
    train = cfg.train.model_copy(update={"image_size": d.image_size or cfg.train.image_size,
                                         "epochs": d.epochs or 2 * cfg.train.epochs,
                                         "lr": cfg.train.lr if hard else d.lr or cfg.train.lr})
    predict = PredictConfig(**{**cfg.predict.model_dump(), "tta": d.tta, "tta_policy": "all"})
    model = cfg.model.model_copy(update={"backbones": [backbone], "only": None})
    return experiments.Experiment(f"{'hard' if hard else 'distill'}-{backbone}", backbone, model, train, predict)


def _starts(ctx: Context, by_name: dict, used: list[str], student: experiments.Experiment, folds: list[int],
            oof_score: dict[str, float]) -> dict[int, Path] | None:
    """distill.init=teacher: fold -> the fold-k run of the used teacher of the student's backbone and image size
    with the best OOF score (its weights fit the student, and it trained on the fold-k student's rows only); None:
    random weights."""
    if ctx.cfg.distill.init == "scratch":
        return None
    same = [n for n in used if by_name[n].backbone == student.backbone
            and by_name[n].train.image_size == student.train.image_size]
    if not same:
        log.info(f"distill: no used teacher is {student.backbone} at {student.train.image_size} px; the student "
                 "starts from random weights")
        return None
    sign = 1 if tasks.greater_is_better(ctx.cfg.competition.metric) else -1
    best = max(same, key=lambda n: sign * oof_score[n])
    log.info(f"distill: the fold-k student starts from {best}'s fold-k weights (OOF {oof_score[best]:.4f})")
    return {k: ctx.work_dir / "runs" / best / f"fold{k}" for k in folds}


def run(ctx: Context) -> dict:
    """Train and score the student (and its hard-label twin), print the table (after the ensemble stage)."""
    check(ctx)
    cfg, comp = ctx.cfg, ctx.competition
    manifest = read_json(ctx.work_dir / "ensemble" / "weights.json", "run `make ensemble`")
    folds_meta = read_json(ctx.work_dir / "folds.json", "run `make folds`")
    classes, task = folds_meta["classes"], cfg.competition.task
    found = ctx.find_predictions(folds_meta["folds_hash"], classes)
    missing = [n for n in manifest["models"] if n not in found]
    if missing:
        raise PipelineError(f"WORK/ensemble/weights.json: model {missing[0]} has no predictions now; run `make "
                            "ensemble` again")
    models = {n: found[n] for n in manifest["models"]}
    names = list(models)
    P, T, _ = prediction_arrays(models, classes, task)
    rows = next(iter(models.values()))[0]
    y, fold_of = tasks.truth(task, rows, classes, cfg.competition.label_separator), rows["fold"].to_numpy()
    e = cfg.ensemble
    settings = BlendSettings(cfg.competition.metric, e.objective, e.caruana_rounds, e.stack_c, e.thresholds, None,
                             e.stack_lightgbm)
    fitted = refit_chosen(manifest["chosen"], P, y, names, settings)
    used = [names[i] for i in used_models(blend_spec(fitted, names, manifest["chosen"]))]
    by_name = ctx.configured_experiments()
    others = [n for n in used if n not in by_name]
    if others:
        raise PipelineError(f"make distill: the teacher {others[0]} has no fold models in WORK/runs (AutoGluon or "
                            "another tool); set ensemble.include_other=false and run `make ensemble distill` again")
    rt = runtime.from_config(cfg.runtime, "classification")
    root = ctx.work_dir / "distill" / "runs"
    folds = folds_to_train(cfg.train.folds, folds_meta["n_splits"])
    student = _student(ctx, by_name, used, hard=False)
    oof_score = {n: score(cfg.competition.metric, y, P[names.index(n)]) for n in used}
    starts = _starts(ctx, by_name, used, student, folds, oof_score)
    stamp = ctx.work_dir / "distill" / "distill.json"
    teacher_files = [ctx.work_dir / "runs" / n / f"fold{k}" / f for n in used for k in folds
                     for f in ("best.json", "best.safetensors")]
    fp = fingerprint("distill", file_digest(ctx.work_dir / "ensemble" / "weights.json"),
                     [file_digest(p) for p in teacher_files], cfg.distill.model_dump(), cfg.train.model_dump(),
                     cfg.model.model_dump(exclude={"backbones", "only"}),
                     cfg.predict.model_dump(exclude={"batch_size"}), runtime.result_keys(cfg.runtime), folds,
                     content_key(comp.test["path"]))  # the student predicts them (and learns them: test_images)
    if is_done(stamp, fp, [root / student.name / "oof.parquet", ctx.work_dir / "distill" / "table.csv"]):
        summary = read_json(stamp, "rerun `make distill`")
        log.info(f"distill: up to date ({stamp}); the table, measured when it ran:\n"
                 + pd.DataFrame(summary["table"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        return summary
    sctx = ctx.for_experiment(student)
    shared: dict = {}
    data = sctx.training_data(shared)
    # OOF rows (sorted by id) -> rows of folds.csv: the teachers' blend is refitted on OOF rows, applied to frame rows
    member_data = {n: ctx.for_experiment(by_name[n]).training_data(shared) for n in used}
    test_ids, test_paths = comp.test["id"], list(comp.test["path"])
    member_test = {n: ctx.decoded_images(test_paths, by_name[n].train.image_size, member_data[n].channels, "test")
                   for n in used} if cfg.distill.test_images else {}
    frame_y = tasks.targets(task, data.frame, classes, cfg.competition.label_separator)  # class index per row
    kept = {n: read_json(ctx.work_dir / "runs" / n / "predict.json", "run `make predict`") for n in used}
    provenance = {}
    for k in folds:
        train_idx = training_rows(data.frame, k)

        def targets(images_of: dict, k: int = k) -> np.ndarray:
            """The fold-k teachers' blended, sharpened probabilities of the images `images_of` gives per member."""
            teachers = np.zeros((len(names), len(next(iter(images_of.values()))), len(classes)))
            for n in used:
                pc = by_name[n].predict
                ranges = {"degrees": pc.tta_random_degrees, "scale": pc.tta_random_scale, "shift": pc.tta_random_shift}
                teachers[names.index(n)] = teacher_proba(ctx.work_dir / "runs" / n / f"fold{k}", images_of[n],
                                                         folds_meta["folds_hash"], classes, kept[n]["tta"],
                                                         kept[n]["tta_merge"], rt, pc.batch_size, pc.tta_seed, ranges)
            return fold_targets(teachers, P, y, fold_of, k, fitted, cfg.distill.temperature)

        train_soft = targets({n: member_data[n].images[train_idx] for n in used})
        train_soft = with_labels(train_soft, frame_y[train_idx], cfg.distill.label_weight)
        key = fingerprint(np.round(train_soft, 6).tolist())
        if cfg.distill.test_images:  # test rows trained by the fold-k student only (rounds' pseudo-row machinery)
            # rounded as the training rows' key is: a resume on another device or batch size keeps its key
            test_soft = np.round(targets(member_test), 6).astype(np.float32)
            rows = pd.DataFrame({"id": test_ids.astype(str).to_numpy(), "path": test_paths,
                                 "label": np.asarray(classes, dtype=object)[test_soft.argmax(1)], "fold": k})
            rows[prob_columns(classes)] = test_soft
            kdata = sctx.with_pseudo(data, rows)  # its soft holds the test rows' targets, NaN for the others
            key = fingerprint(key, kdata.pseudo_keys[k])
        else:
            kdata = replace(data, soft=np.full((len(data.frame), len(classes)), np.nan, dtype=np.float32))
        kdata.soft[:len(data.frame)][train_idx] = train_soft
        provenance[str(k)] = [f"runs/{n}/fold{k}" for n in used]
        kdata = replace(kdata, pseudo_keys={k: key})
        train_fold(replace(sctx.fold_settings(runs_root=root), init_from=starts), student.backbone, k, kdata,
                   name=student.name)
    results = {"student": predict_experiment(replace(sctx.predict_settings(), runs_root=root), student.backbone,
                                             data, test_ids, test_paths, student.name)}
    hard = None
    if cfg.distill.hard_baseline:
        hard = _student(ctx, by_name, used, hard=True)
        hctx = ctx.for_experiment(hard)
        for k in folds:
            train_fold(hctx.fold_settings(runs_root=root), hard.backbone, k, data, name=hard.name)
        results["hard"] = predict_experiment(replace(hctx.predict_settings(), runs_root=root), hard.backbone, data,
                                             test_ids, test_paths, hard.name)
    table = _table(ctx, manifest, used, by_name, student, hard, results, folds, folds_meta, rt, test_paths)
    write_csv(ctx.work_dir / "distill" / "table.csv", table)
    summary = {"student": student.name, "teachers": used, "blend": manifest["chosen"], "targets_from": provenance,
               "starts_from": {str(k): str(p.relative_to(ctx.work_dir)) for k, p in (starts or {}).items()},
               "lr": student.train.lr,
               "temperature": cfg.distill.temperature, "table": table.to_dict(orient="records")}
    write_stamp(stamp, fp, **summary)
    metric = cfg.competition.metric
    row = (f"the {manifest['chosen']} row" if manifest["chosen"] in used
           else f"the {manifest['chosen']} blend of {', '.join(used)}")
    log.info(f"distill: {student.name} learnt {row} (fold k from the fold-k teachers only); honest OOF {metric} "
             f"and {rt.device.type.upper()} milliseconds per image:\n"
             + table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return summary


TIMED_IMAGES = 1024  # the table's speeds: enough images for a stable median, bounded on a large test set


def _table(ctx: Context, manifest: dict, used: list[str], by_name: dict, student, hard, results: dict,
           folds: list[int], folds_meta: dict, rt, test_paths: list[str]) -> pd.DataFrame:
    """Ensemble vs student vs hard-label twin: honest score, ms per image and speed-up over the ensemble (decoded
    test images; every fold model and kept view a row predicts with, loaded beforehand; the rows timed
    interleaved)."""
    timed_paths = test_paths[:TIMED_IMAGES]

    def runner(folder, name, views, pc) -> list:
        loaded = []
        for k in folds:
            model, meta = load_checkpoint(folder / name / f"fold{k}", folds_meta["folds_hash"], folds_meta["classes"])
            loaded.append((rt.prepare(model), meta))
        images = ctx.decoded_images(timed_paths, loaded[0][1]["image_size"], loaded[0][1]["in_chans"], "test")
        ranges = {"degrees": pc.tta_random_degrees, "scale": pc.tta_random_scale, "shift": pc.tta_random_shift}
        return [partial(view_logits, m, images, views, rt, meta["norm"], pc.batch_size, pc.tta_seed, ranges)
                for m, meta in loaded]

    def every(calls: list):
        return lambda: [c() for c in calls]

    teacher_calls = []
    for n in used:
        pm = read_json(ctx.work_dir / "runs" / n / "predict.json", "run `make predict`")
        teacher_calls += runner(ctx.work_dir / "runs", n, pm["tta"], by_name[n].predict)
    ensemble = f"ensemble ({manifest['chosen']}: {len(used)} members x {len(folds)} folds, their TTA views)"
    rows = [(ensemble, manifest["honest_score"], every(teacher_calls))]
    root = ctx.work_dir / "distill" / "runs"
    for exp, key in ((student, "student"), (hard, "hard")):
        if exp is None:
            continue
        calls = runner(root, exp.name, exp.predict.tta, exp.predict)
        score = results[key]["oof_score"]  # every view kept (tta_policy all): nothing chosen on OOF, so honest
        what = "student, soft targets" if key == "student" else "same backbone, hard labels"
        rows.append((f"{exp.name} ({what}, one fold model)", score, every(calls[:1])))
        rows.append((f"{exp.name} ({what}, mean of {len(folds)} fold models)", score, every(calls)))
    speeds = ms_per_image({name: run for name, _, run in rows}, len(timed_paths), baseline=ensemble)
    return pd.DataFrame([{"model": name, "honest_score": score, "ms_per_image": speeds[name][0],
                          "speedup": speeds[name][1]} for name, score, _ in rows])
