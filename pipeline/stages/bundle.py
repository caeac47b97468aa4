"""Bundle stage: the chosen submission as an offline folder, submissions/<competition>-bundle/ (export/bundle.py).

Reads WORK/ensemble/weights.json (the chosen row and its thresholds), the models' OOF and test files (to refit the
chosen blend exactly; see export/bundle.py), each used experiment's predict.json (folds, TTA views kept, merge) and
each fold's best.json and best.safetensors (backbone, head, input size, channels, normalisation). Skipped when the
bundle's stamp (spec.json's fingerprint) matches all of these.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pipeline.context import Context
from pipeline.core.artifacts import file_digest, fingerprint, read_json, read_stamp
from pipeline.core.config import PredictConfig
from pipeline.core.errors import PipelineError
from pipeline.data.competition import image_location
from pipeline.detection.data import is_detection_folder
from pipeline.export import bundle, bundle_predict
from pipeline.export.onnx_export import export_onnx, view_sizes
from pipeline.scoring import submission, tasks
from pipeline.scoring.blend import BlendSettings, refit_chosen
from pipeline.scoring.predictions import prediction_arrays
from pipeline.stages import bundle_detection
from pipeline.training.checkpoint import load_checkpoint

log = logging.getLogger(__name__)
# the bundle's ONNX files are optional: without them predict.py runs on torch
ONNX_FIX = "set export.bundle_onnx=false (predict.py then runs on torch; the previous bundle is kept until then)"


def _member(name: str, folder, drop_rate: float, pc: PredictConfig, folds_meta: dict,
            only_folds: list[int] | None) -> tuple[dict, dict]:
    """(the member's spec, {bundle path: source file}) of the experiment whose predictions are in `folder`: every
    fold model its predictions used, or `only_folds` of them."""
    pred_meta = read_json(folder / "predict.json", "run `make predict`")
    folds, files = [], {}
    for k in _folds(pred_meta["folds"], only_folds, folder):
        run_dir = folder / f"fold{k}"
        _, meta = load_checkpoint(run_dir, folds_meta["folds_hash"], folds_meta["classes"])  # refuses a mismatch
        rel = f"weights/{name}-fold{k}.safetensors"
        files[rel] = run_dir / "best.safetensors"
        head = meta.get("head") or {"task": "single_label", "n_out": len(folds_meta["classes"]), "loss": "ce",
                                    "center": 0.0, "scale": 1.0}
        folds.append({"fold": k, "weights": rel, "norm": meta["norm"], "head": head,
                      "image_size": meta["image_size"], "in_chans": meta["in_chans"]})
    sizes = {(f["image_size"], f["in_chans"]) for f in folds}
    if len(sizes) != 1:
        raise PipelineError(f"{folder}: its fold models differ in image size or channels {sorted(sizes)}; "
                            "rerun `make train` for this experiment")
    size, chans = sizes.pop()
    spec = {"name": name, "backbone": pred_meta["backbone"], "image_size": size, "in_chans": chans,
            "drop_rate": drop_rate, "folds": folds,
            "tta": {"views": pred_meta["tta"], "merge": pred_meta["tta_merge"], "seed": pc.tta_seed,
                    "degrees": pc.tta_random_degrees, "scale": pc.tta_random_scale, "shift": pc.tta_random_shift}}
    return spec, files


def _folds(made_with: list[int], only: list[int] | None, folder) -> list[int]:
    if only is None:
        return list(made_with)
    unknown = sorted(set(only) - set(made_with))
    if unknown:
        raise PipelineError(f"export.bundle_folds: fold {unknown[0]} has no model in {folder} (it has folds "
                            f"{made_with}); choose among those")
    return [k for k in made_with if k in only]


def _test_predictions(folder, test_ids: pd.Series, task: str, classes: list[str], only_folds: list[int] | None
                      ) -> np.ndarray:
    """The test predictions the bundle must reproduce: test.parquet, or the mean of the kept fold models' rows of
    test_folds.parquet (the mean over fold models is how predict and predict.py both combine them)."""
    cols = tasks.columns(task, classes)
    if only_folds is None:
        frame = pd.read_parquet(folder / "test.parquet").set_index("id")
    else:
        per_fold = pd.read_parquet(folder / "test_folds.parquet")
        frame = per_fold[per_fold["fold"].isin(only_folds)].groupby("id", sort=False)[cols].mean()
    return frame.loc[test_ids, cols].to_numpy(np.float64)


def _submission_spec(ctx: Context) -> dict:
    comp = ctx.competition
    kind = submission.output_kind(comp, ctx.cfg.ensemble.output)
    if comp.sample_submission is not None:
        value_cols = [c for c in comp.sample_submission.columns if c != comp.id_column]
    else:
        value_cols = list(comp.classes) if kind == "probabilities" else [comp.label_column]
    return {"kind": kind, "id_column": comp.id_column, "value_columns": value_cols}


def run(ctx: Context) -> dict:
    """Write the bundle of the ensemble's chosen submission, or of the distilled student (export.bundle_of); for a
    detection folder, of the detection track's submission (stages/bundle_detection.py)."""
    if is_detection_folder(ctx.data_dir, ctx.cfg.detect.data.train_csv):
        return bundle_detection.run(ctx)
    if ctx.cfg.export.bundle_of == "student":
        return _student_bundle(ctx)
    comp, cfg = ctx.competition, ctx.cfg
    only_folds = cfg.export.bundle_folds
    weights_json = ctx.work_dir / "ensemble" / "weights.json"
    manifest = read_json(weights_json, "run `make ensemble`")
    folds_meta = read_json(ctx.work_dir / "folds.json", "run `make folds`")
    models = ctx.find_predictions(folds_meta["folds_hash"], folds_meta["classes"])
    names = list(models)
    if names != manifest["models"]:
        raise PipelineError(f"{weights_json}: made from models {manifest['models']}, WORK now holds {names}; "
                            "run `make ensemble` again")
    out_dir = ctx.submissions_dir / f"{comp.name}-bundle{_folds_suffix(only_folds)}"
    by_name = ctx.configured_experiments()
    runs = [models[n][2] / f"fold{k}" / f for n in names if n in by_name
            for k in read_json(models[n][2] / "predict.json", "run `make predict`")["folds"]
            for f in ("best.json", "best.safetensors")]
    runs += [models[n][2] / "predict.json" for n in names if n in by_name]  # the TTA views kept
    fp = fingerprint("bundle", file_digest(weights_json), [file_digest(p) for p in runs if p.is_file()],
                     cfg.export.model_dump(), cfg.predict.model_dump(), comp.id_column, comp.classes,
                     cfg.competition.model_dump(), cfg.ensemble.output)
    stamp = read_stamp(out_dir / "spec.json")
    if stamp is not None and stamp.get("fingerprint") == fp and (out_dir / "predict.py").is_file():
        log.info(f"bundle: up to date: {out_dir}")
        return stamp

    task, sep, metric = cfg.competition.task, cfg.competition.label_separator, cfg.competition.metric
    P, T, test_ids = prediction_arrays(models, folds_meta["classes"], task)
    rows = next(iter(models.values()))[0]
    y = tasks.truth(task, rows, folds_meta["classes"], sep)
    e = cfg.ensemble
    settings = BlendSettings(metric, e.objective, e.caruana_rounds, e.stack_c, e.thresholds,
                             len(folds_meta["classes"]) if task == "ordinal" else None, e.stack_lightgbm)
    fitted = refit_chosen(manifest["chosen"], P, y, names, settings)
    blend_spec = bundle.blend_spec(fitted, names, manifest["chosen"])
    expected_file = ctx.work_dir / "ensemble" / "test.parquet"
    expected = pd.read_parquet(expected_file).set_index("id").loc[test_ids, tasks.columns(task, comp.classes)]
    diff = bundle.check_blend(blend_spec, T, expected.to_numpy(np.float64), expected_file)
    keep = bundle.used_models(blend_spec)
    blend_spec = bundle.restrict(blend_spec, keep)

    members, files = [], {}
    for i in keep:
        name, folder = names[i], models[names[i]][2]
        exp = by_name.get(name)
        if exp is None or folder != ctx.work_dir / "runs" / name:
            raise PipelineError(f"{folder}: predictions made outside the pipeline's runs (AutoGluon or another "
                                "tool) have no weights to bundle; set ensemble.include_other=false and run `make "
                                "ensemble bundle` again")
        spec, member_files = _member(name, folder, exp.model.drop_rate, exp.predict, folds_meta, only_folds)
        members.append(spec)
        files.update(member_files)
    if only_folds is not None:
        # fewer fold models per member: the bundle's own predictions, checked against the same fold models' rows
        T_kept = np.stack([_test_predictions(models[names[i]][2], test_ids, task, comp.classes, only_folds)
                           for i in keep])
        expected_kept = bundle_predict.blend(T_kept, blend_spec)
        diff = bundle.check_blend(blend_spec, T_kept, expected_kept, expected_file)
        agree = float(np.mean(expected_kept.argmax(1) == expected.to_numpy().argmax(1))) if task != "regression" \
            else float("nan")
        log.info(f"bundle: fold models {only_folds} only: its test predictions agree with the submission's "
                 f"labels on {agree:.1%} of the rows")
    folders = {m["name"]: models[m["name"]][2] for m in members}
    _write(ctx, out_dir, fp, members, files, blend_spec, manifest.get("thresholds"), manifest.get("honest_score"),
           folds_meta, folders)
    n_weights = sum(len(m["folds"]) for m in members)
    log.info(f"bundle: {out_dir}: {len(members)} members ({', '.join(m['name'] for m in members)}), {n_weights} "
             f"weight files, blend {blend_spec['name']} ({blend_spec['how']}; reproduces its test predictions "
             f"to {diff:.1e}); run: python {out_dir / 'predict.py'} --data {ctx.data_dir} --out submission.csv")
    return read_stamp(out_dir / "spec.json")


def _folds_suffix(only_folds: list[int] | None) -> str:
    return "" if only_folds is None else "-folds" + "".join(str(k) for k in sorted(only_folds))


def _student_bundle(ctx: Context) -> dict:
    """submissions/<competition>-student-bundle/: the distilled student alone (its fold models, or
    export.bundle_folds of them, with its own views), reproducing its test predictions."""
    comp, cfg = ctx.competition, ctx.cfg
    only_folds = cfg.export.bundle_folds
    if cfg.competition.task not in ("single_label", "auto"):
        raise PipelineError(f"export.bundle_of=student: students exist for single_label tasks only; this one is "
                            f"{cfg.competition.task}: set export.bundle_of=ensemble")
    summary_file = ctx.work_dir / "distill" / "distill.json"
    summary = read_json(summary_file, "run `make distill` first (export.bundle_of=student bundles its student)")
    name = summary["student"]
    folder = ctx.work_dir / "distill" / "runs" / name
    folds_meta = read_json(ctx.work_dir / "folds.json", "run `make folds`")
    made_with = read_json(folder / "predict.json", "run `make distill` again")["folds"]
    runs = [folder / f"fold{k}" / f for k in made_with for f in ("best.json", "best.safetensors")]
    fp = fingerprint("bundle-student", file_digest(summary_file), file_digest(folder / "predict.json"),
                     [file_digest(p) for p in runs], cfg.export.model_dump(), cfg.predict.model_dump(),
                     comp.id_column, comp.classes, cfg.competition.model_dump(), cfg.ensemble.output)
    out_dir = ctx.submissions_dir / f"{comp.name}-student-bundle{_folds_suffix(only_folds)}"
    stamp = read_stamp(out_dir / "spec.json")
    if stamp is not None and stamp.get("fingerprint") == fp and (out_dir / "predict.py").is_file():
        log.info(f"bundle: up to date: {out_dir}")
        return stamp
    member, files = _member(name, folder, cfg.model.drop_rate, cfg.predict, folds_meta, only_folds)
    test_ids = comp.test["id"].astype(str)
    blend_spec = {"name": name, "how": "single", "models": [name], "weights": [1.0]}
    expected = _test_predictions(folder, test_ids, "single_label", folds_meta["classes"], only_folds)
    diff = bundle.check_blend(blend_spec, expected[None], expected, folder / "test.parquet")
    honest = read_json(folder / "predict.json", "run `make distill` again").get("oof_score")
    _write(ctx, out_dir, fp, [member], files, blend_spec, None, honest, folds_meta, {name: folder})
    log.info(f"bundle: {out_dir}: the student {name} alone ({len(member['folds'])} fold models, views "
             f"{member['tta']['views']}; honest OOF {honest:.4f}; reproduces its test predictions to {diff:.1e}); "
             f"run: python {out_dir / 'predict.py'} --data {ctx.data_dir} --out submission.csv")
    return read_stamp(out_dir / "spec.json")


def _write(ctx: Context, out_dir, fp: str, members: list[dict], files: dict, blend_spec: dict, thresholds,
           honest_score, folds_meta: dict, folders: dict) -> None:
    """spec.json and the bundle folder (export/bundle.py writes it atomically); `folders` maps each member to the
    folder of its fold models (for the ONNX files)."""
    comp, cfg = ctx.competition, ctx.cfg
    if cfg.clean.transfer_test_labels and (ctx.work_dir / "test_label_overrides.csv").exists():
        log.info("bundle: clean.transfer_test_labels=true replaced some test labels by their training duplicate's; "
                 "the bundle predicts every test image itself, so those rows may differ from the submission")
    image_dir, image_suffix = image_location(ctx.data_dir.resolve(), str(comp.test["id"].iloc[0]), cfg.competition,
                                             ctx.data_dir / cfg.competition.test_csv, 2)
    spec = {"fingerprint": fp, "format": 1, "competition": comp.name, "task": cfg.competition.task,
            "classes": comp.classes, "separator": comp.separator, "metric": cfg.competition.metric,
            "honest_score": honest_score,
            "input": {"test_csv": cfg.competition.test_csv, "id_column": comp.id_column,
                      "image_dir": image_dir, "image_suffix": image_suffix,
                      "sample_submission_csv": cfg.competition.sample_submission_csv,
                      "max_pixels": cfg.clean.max_pixels},
            "submission": _submission_spec(ctx), "members": members, "blend": blend_spec,
            "thresholds": thresholds, "versions": bundle.versions()}

    def onnx_writer(folder):
        """Every fold model as ONNX; a graph of fixed size (export_onnx) gets one file per size its views feed.
        fold["onnx"] maps a side (or "any") to its file; spec.json is written after this."""
        for member in members:
            for fold in member["folds"]:
                model, _ = load_checkpoint(folders[member["name"]] / f"fold{fold['fold']}",
                                           folds_meta["folds_hash"], folds_meta["classes"])
                stem = f"onnx/{member['name']}-fold{fold['fold']}"
                size, chans = member["image_size"], member["in_chans"]
                if export_onnx(model, folder / f"{stem}.onnx", chans, size, cfg.export.opset, ONNX_FIX):
                    fold["onnx"] = {"any": f"{stem}.onnx"}
                    continue
                fold["onnx"] = {str(size): f"{stem}.onnx"}
                for side in view_sizes(size, member["tta"]["views"]):
                    if side != size:
                        fold["onnx"][str(side)] = f"{stem}-{side}px.onnx"
                        export_onnx(model, folder / fold["onnx"][str(side)], chans, side, cfg.export.opset, ONNX_FIX)

    bundle.write_bundle(out_dir, spec, files, onnx_writer if cfg.export.bundle_onnx else None)
