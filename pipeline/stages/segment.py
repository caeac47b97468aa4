"""Segment stage (`make segment`): masks in, run-length encodings out. Orchestration and artifacts; the library is
pipeline/segmentation/ (reader, models, fit, infer, blend, post, submit). Each step's key holds what it reads.

- folds: WORK/segment/folds.csv, stratified on which classes an image holds, duplicate groups of WORK/clean.csv
  kept together (recomputed on every run: the same seed gives the same folds).
- per member of segment.models (one network each) and fold k, WORK/segment/<member>/fold<k>/:
  - train: model.safetensors, model.json (stamp), history.csv, curves.png, last.* (resume), best.safetensors and
    mlflow.json (its MLflow run: params, per-epoch metrics, curves; pipeline/training/tracking.py).
    Key: the images' and masks' content, the images the fold holds out, the member's entry (not its name),
    segment.train and the runtime keys that change results: changing or adding a member retrains no other.
  - oof_views.npy (+ oof_views.json): uint8 probabilities of the held-out images, every view segment.views enables.
    Key: the model's key and the views.
  - test.npy (+ test.json): uint8 probabilities of the test images with the views chosen on the member's OOF, for
    the members the blend uses. Key: the model's key, the chosen views and the test images' content.
- per member, WORK/segment/<member>/oof.npy (+ oof.json): its OOF maps under the views with the best OOF Dice.
- then, from those files (seconds, on every run): the blend of the members (each alone, the mean, weights on a
  simplex grid) with the best OOF Dice at 0.5, per-class threshold and smallest component chosen on the blend's
  OOF Dice, both nested over the folds for the honest figure; leaderboard.csv, metrics.json, gallery_oof.png,
  oof.npy (the blend's OOF maps) and the submission SUBMISSIONS/<competition>.csv in the sample submission's form,
  checked before it is written (pipeline/segmentation/submit.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from pipeline.context import Context
from pipeline.core.artifacts import (
    atomic_write,
    content_key,
    file_digest,
    fingerprint,
    is_done,
    read_stamp,
    write_csv,
    write_json,
    write_stamp,
)
from pipeline.core.config import SegmentMemberConfig, SegmentThresholdsConfig, SegmentTrainConfig, config_hash
from pipeline.data.cache import cached_decode
from pipeline.data.quality import clean_csv
from pipeline.detection.folds import assign_folds, image_groups
from pipeline.scoring.submission import write_submission
from pipeline.segmentation import models
from pipeline.segmentation.arrays import mask_array, masks_key, presence, presence_strata
from pipeline.segmentation.blend import Blended, blend_maps, blend_scores, candidate_weights, choose_blend, nested_blend
from pipeline.segmentation.data import SegmentationData, read_segmentation
from pipeline.segmentation.fit import SegmentationTrainer
from pipeline.segmentation.gallery import gallery
from pipeline.segmentation.infer import combine, predict_views, view_sets
from pipeline.segmentation.metrics import dice
from pipeline.segmentation.post import choose, drop_small, grid_scores, nested, to_masks
from pipeline.segmentation.rle import encode
from pipeline.segmentation.submit import build_frame, validate_segmentation
from pipeline.training import checkpoint, runtime, tracking
from pipeline.training.plots import plot_panels
from pipeline.training.runtime import Runtime

log = logging.getLogger(__name__)


def read_data(ctx: Context) -> SegmentationData:
    cfg = ctx.cfg.segment
    comp = ctx.cfg.competition.model_copy(update={"train_csv": cfg.data.train_csv, "test_csv": cfg.data.test_csv})
    return read_segmentation(ctx.data_dir, comp, cfg.data.masks_dir)


def readable(data: SegmentationData, clean: Path) -> SegmentationData:
    """The training images the clean stage could decode: clean.csv lists every other one, and an image it left out
    (WORK/dropped.csv) would stop the image cache."""
    if not clean.is_file():
        return data
    kept = set(pd.read_csv(clean, dtype={"id": str}, usecols=["id"], keep_default_na=False)["id"])
    rows = np.array([i for i, ident in enumerate(data.train.ids) if ident in kept], dtype=np.int64)
    if len(rows) in (0, len(data.train)):  # none listed: a clean.csv of other images, which names nothing to skip
        return data
    log.warning(f"segment: {len(data.train) - len(rows)} training images the clean stage could not decode are left "
                f"out ({clean.parent / 'dropped.csv'}); replace the files to train on them")
    return data.only(rows)


def model_inputs(member: SegmentMemberConfig, train: SegmentTrainConfig) -> dict:
    """What of a member changes its trained weights: its entry (not its name, which only names its folder), the
    pretrained file's bytes, and segment.train."""
    path = member.pretrained_path
    return {"model": member.model_dump(exclude={"name"}), "pretrained_bytes": file_digest(Path(path)) if path else None,
            "train": train.model_dump()}


def _build(member: SegmentMemberConfig, n_classes: int) -> torch.nn.Module:
    return models.create(member.arch, member.encoder, n_classes, member.encoder_weights)


def _loader(member: SegmentMemberConfig, n_classes: int, rt: Runtime, out: Path):
    """A function that builds the fold model and loads out/model.safetensors: models are read only when a map they
    predict is missing or stale, so a rerun with every map stored loads none."""
    def load() -> torch.nn.Module:
        model = rt.prepare(_build(member, n_classes))
        model.load_state_dict(load_file(str(out / "model.safetensors")))
        return model

    return load


def _train(ctx: Context, member: SegmentMemberConfig, key: str, n_classes: int, images: np.ndarray,
           masks: np.ndarray, rest: np.ndarray, held: np.ndarray, rt: Runtime, out: Path, seed: int
           ) -> tuple[str, dict]:
    """One fold model of a member: kept when model.json matches its key, else trained (resuming from last.*);
    returns its key and training summary."""
    cfg = ctx.cfg.segment
    fp = fingerprint("segment-train", key, model_inputs(member, cfg.train), seed, runtime.result_keys(ctx.cfg.runtime))
    stamp = read_stamp(out / "model.json") or {}
    where = f"{member.label}/{out.name}"
    if stamp.get("fingerprint") == fp and (out / "model.safetensors").exists():
        log.info(f"segment: {where} model up to date ({out / 'model.safetensors'})")
        return fp, stamp["summary"]
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = rt.prepare(_build(member, n_classes))
    if member.pretrained_path:  # before training; a resumed run then loads its own last weights over these
        log.info(f"segment: initialised the {models.load_pretrained(model, Path(member.pretrained_path))}")
    train_cfg = cfg.train.model_copy(update={"seed": seed})
    trainer = SegmentationTrainer(model, train_cfg, images, masks, rest, held, out, fp, rt)
    params = {"model": f"{member.arch}-{member.encoder}", "member": member.label, "fold": out.name,
              **tracking.flatten({"segment": {"member": member.model_dump(), "train": train_cfg.model_dump()}})}
    track = tracking.start(ctx.tracking_settings(), out, member.label, fp, params, {"stage": "segment"})
    try:
        history = pd.DataFrame(trainer.fit())
    except BaseException as exc:
        track.stop(exc)
        raise
    checkpoint.save_weights(out / "model.safetensors", model)
    write_csv(out / "history.csv", history)
    plot_panels(history, {"loss": ["train_loss"], "validation Dice": ["val_dice", "val_dice_post"]}, out / "curves.png",
                f"{member.label} ({member.arch} on {member.encoder}), {out.name}")
    track.finish(history.to_dict("records"), [out / "history.csv", out / "curves.png"])  # before the stamp
    best = history.loc[history["epoch"] == trainer.best_epoch].iloc[0]
    summary = {"epochs": len(history), "best_epoch": trainer.best_epoch, "val_dice": float(best["val_dice_post"]),
               "train_seconds": float(history["seconds"].sum()), "device": str(rt.device)}
    write_stamp(out / "model.json", fp, summary=summary)
    return fp, summary


def _predicted(out: Path, name: str, fp: str, predict) -> np.ndarray:
    """out/<name>.npy (stamp <name>.json with key fp), written by predict(memmap-path) when missing or stale."""
    path, stamp = out / f"{name}.npy", out / f"{name}.json"
    if not is_done(stamp, fp, [path]):
        atomic_write(path, predict)
        write_stamp(stamp, fp)
    return np.load(path, mmap_mode="r")


def _write_npy(images: np.ndarray, rows: np.ndarray | None, load, views, batch: int, rt: Runtime, combined: bool,
               n_classes: int, size: int):
    """A writer of the uint8 probabilities of images[rows] (all of them: None) by the model load() returns into a
    .npy memmap, batch by batch (never all of them as floats); the model and the rows are read only when it runs."""
    n = len(images) if rows is None else len(rows)
    shape = (n, n_classes, size, size) if combined else (n, len(views), n_classes, size, size)

    def write(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        predict_views(load(), images if rows is None else images[rows], views, batch, rt, out=out, combined=combined)
        out.flush()

    return write


def _choose_views(fold_oof: list[np.ndarray], helds: list[np.ndarray], masks: np.ndarray, all_views: tuple[str, ...],
                  candidates: list[tuple[str, ...]]) -> tuple[tuple[str, ...], dict[str, float]]:
    """The view set with the best OOF Dice at threshold 0.5 (ties: the fewer views, tried first)."""
    scores = {}
    for views in candidates:
        pick = [all_views.index(v) for v in views]
        per_image = [dice(combine(oof[:, pick]) >= 128, masks[np.sort(held)].astype(bool))
                     for oof, held in zip(fold_oof, helds, strict=True)]
        scores["+".join(views)] = float(np.concatenate(per_image).mean())
    best = max(candidates, key=lambda v: (scores["+".join(v)], -len(v)))
    return best, scores


@dataclass
class Member:
    """What the stage keeps of one member after its folds: keys, training summaries, the views chosen on its OOF
    and its OOF maps under them (a memmap)."""

    cfg: SegmentMemberConfig
    root: Path
    fps: list[str]
    summaries: list[dict]
    views: tuple[str, ...]
    view_scores: dict[str, float]
    oof: np.ndarray
    oof_key: str


def _member(ctx: Context, member: SegmentMemberConfig, base_keys: list[str], folds: list[tuple[np.ndarray, np.ndarray]],
            images: np.ndarray, masks: np.ndarray, n_classes: int, rt: Runtime) -> Member:
    """A member's fold models, OOF maps under every enabled view, its views chosen on OOF, and its OOF maps under
    them (WORK/segment/<name>/oof.npy), each kept while its key holds."""
    cfg = ctx.cfg.segment
    root, size, batch = ctx.work_dir / "segment" / member.label, cfg.train.image_size, cfg.train.batch_size
    all_views = view_sets(cfg.views.hflip, cfg.views.vflip)[-1]
    fps, fold_oof, oof_fps, summaries = [], [], [], []
    for k, (key, (held, rest)) in enumerate(zip(base_keys, folds, strict=True)):
        out = root / f"fold{k}"
        fp, summary = _train(ctx, member, key, n_classes, images, masks, rest, held, rt, out, cfg.train.seed + k)
        oof_fps.append(fingerprint("segment-oof", fp, all_views))
        fold_oof.append(_predicted(out, "oof_views", oof_fps[-1], _write_npy(
            images, held, _loader(member, n_classes, rt, out), all_views, batch, rt, False, n_classes, size)))
        fps.append(fp)
        summaries.append(summary)

    helds = [held for held, _ in folds]
    views, view_scores = _choose_views(fold_oof, helds, masks, all_views, view_sets(cfg.views.hflip, cfg.views.vflip))
    log.info(f"segment: {member.label}: OOF Dice by views (threshold 0.5): "
             + ", ".join(f"{v} {s:.4f}" for v, s in view_scores.items()) + f"; kept {'+'.join(views)}")
    pick = [all_views.index(v) for v in views]

    def assemble(tmp: Path) -> None:  # fold by fold into a memmap: one fold's maps in memory at a time
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(masks), n_classes, size, size))
        for held, oof in zip(helds, fold_oof, strict=True):
            out[held] = combine(oof[:, pick])
        out.flush()

    oof_key = fingerprint("segment-oof-views", oof_fps, views)
    oof = _predicted(root, "oof", oof_key, assemble)
    return Member(member, root, fps, summaries, views, view_scores, oof, oof_key)


def _submission(ctx: Context, data: SegmentationData, tests: list[list[np.ndarray]], weights: np.ndarray,
                thresholds: list[float], areas: list[int]) -> pd.DataFrame:
    """RLE of every test image and class, `predict.chunk` images at a time: per member the rounded mean of its fold
    models' maps, blended with the weights (the members of weight > 0: tests[m], weights[m]), resized to the image
    and post-processed."""
    rles: dict[tuple[str, str], str] = {}
    chunk = ctx.cfg.segment.predict.chunk
    for start in range(0, len(data.test), chunk):
        per_member = [combine(np.stack([np.asarray(t[start:start + chunk]) for t in folds], 1)) for folds in tests]
        probs = blend_maps(per_member, weights)
        for j, p in enumerate(probs):
            i = start + j
            for c, mask in zip(data.classes, to_masks(p, data.test.shape(i), thresholds, areas), strict=True):
                rles[(data.test.ids[i], c)] = encode(mask)
    return build_frame(data, rles)


def _post_choice(grid: SegmentThresholdsConfig, tables: dict[int, list[np.ndarray]], chosen: int,
                 per_fold: dict[int, int], fold: np.ndarray) -> dict:
    """Per class, the threshold and smallest component with the best OOF Dice of blend `chosen` (for the
    submission), and the nested figure: fold k post-processed with the pair chosen on the other folds' maps of
    blend per_fold[k] (itself chosen without fold k). tables[i][c]: grid_scores of blend i, class c."""
    out = {"thresholds": [], "areas": [], "optimistic": [], "honest": [], "choices": []}
    for c in range(len(tables[chosen])):
        best = choose(tables[chosen][c], grid.probability, grid.min_area)
        fair, choices = nested({k: tables[i][c] for k, i in per_fold.items()}, fold, grid.probability, grid.min_area)
        out["thresholds"].append(best.threshold)
        out["areas"].append(best.min_area)
        out["optimistic"].append(best.score)
        out["honest"].append(fair)
        out["choices"].append([(x.threshold, x.min_area) for x in choices])
    out["honest"] = np.stack(out["honest"], 1)  # (N, C)
    return out


def _shares(members: list[Member], w: np.ndarray) -> dict[str, float]:
    return {m.cfg.label: round(float(x), 6) for m, x in zip(members, w, strict=True)}


def _report(classes: list[str], members: list[Member], weights: np.ndarray, scores: np.ndarray, chosen: int,
            per_fold: dict[int, int], post: dict, member_post: list[dict], fold: np.ndarray) -> tuple[dict, list[dict]]:
    """metrics.json and the leaderboard rows: per fold the nested blend; with several members each member alone
    (OOF at 0.5, nested); the blend on OOF at 0.5, chosen on OOF (optimistic) and nested. With one member the rows
    are the fold model's and the OOF's, as before there were members."""
    plain = scores[chosen]  # (N, C): Dice at 0.5 of the chosen blend
    several = len(members) > 1
    per_class = [{"class": name, "threshold": post["thresholds"][c], "min_area": post["areas"][c],
                  "oof_dice_0.5": float(plain[:, c].mean()), "oof_dice_chosen": post["optimistic"][c],
                  "nested_dice": float(post["honest"][:, c].mean()), "nested_choices": post["choices"][c]}
                 for c, name in enumerate(classes)]
    summaries = [s for m in members for s in m.summaries]
    metrics = {"oof_dice_0.5": float(plain.mean()), "oof_dice_chosen": float(np.mean(post["optimistic"])),
               "nested_dice": float(post["honest"].mean()),
               "thresholds": dict(zip(classes, post["thresholds"], strict=True)),
               "min_area": dict(zip(classes, post["areas"], strict=True)), "folds": len(members[0].summaries),
               "train_seconds": float(sum(s["train_seconds"] for s in summaries)), "per_class": per_class,
               "weights": _shares(members, weights[chosen]),
               "nested_weights": {f"fold{k}": _shares(members, weights[i]) for k, i in per_fold.items()},
               "members": [{"name": m.cfg.label, "arch": m.cfg.arch, "encoder": m.cfg.encoder,
                            "views": list(m.views), "view_scores": m.view_scores,
                            "oof_dice_0.5": float(scores[i].mean()), "nested_dice": float(mp["honest"].mean()),
                            "folds": m.summaries} for i, (m, mp) in enumerate(zip(members, member_post, strict=True))]}
    if several:
        metrics["candidates"] = [{"weights": _shares(members, w), "oof_dice_0.5": float(scores[i].mean())}
                                 for i, w in enumerate(weights)]

    def row(part: str, scoring: str, means: np.ndarray, **extra) -> dict:
        return {"part": part, "scoring": scoring, **extra, "dice": float(np.mean(means)),
                **{f"dice_{c}": float(v) for c, v in zip(classes, means, strict=True)}}

    honest = post["honest"]
    if several:
        board = [row(f"fold{k}", "nested (honest)", honest[fold == k].mean(0), images=int((fold == k).sum()),
                     weights=_text(members, weights[per_fold[k]])) for k in sorted(per_fold)]
        for i, (m, mp) in enumerate(zip(members, member_post, strict=True)):
            board += [row(m.cfg.label, "threshold 0.5", scores[i].mean(0), images=len(fold),
                          weights=_text(members, weights[i])),
                      row(m.cfg.label, "nested (honest)", mp["honest"].mean(0), images=len(fold),
                          weights=_text(members, weights[i]))]
        blend = {"weights": _text(members, weights[chosen])}
    else:
        board = [row(f"fold{k}", "nested (honest)", honest[fold == k].mean(0), images=int((fold == k).sum()),
                     epochs=summary["epochs"], best_epoch=summary["best_epoch"], val_dice=summary["val_dice"])
                 for k, summary in enumerate(members[0].summaries)]
        blend = {}
    board += [row("OOF", "threshold 0.5", plain.mean(0), images=len(fold), **blend),
              row("OOF", "chosen on OOF (optimistic)", np.array(post["optimistic"]), images=len(fold), **blend),
              row("OOF", "nested (honest)", honest.mean(0), images=len(fold), **blend)]
    return metrics, board


def _text(members: list[Member], w: np.ndarray) -> str:
    return " ".join(f"{m.cfg.label}:{x:.2f}" for m, x in zip(members, w, strict=True) if x > 0)


def run(ctx: Context) -> dict:
    cfg = ctx.cfg.segment
    runtime.set_threads(ctx.cfg.runtime.threads)
    data = readable(read_data(ctx), clean_csv(ctx.work_dir))
    log.info(f"segment: {len(data.train)} train images, {len(data.test)} test; classes {data.classes} "
             f"({data.mask_form} masks, {data.submission_form} submission)")
    rt = runtime.from_config(ctx.cfg.runtime, "segmentation")
    root, size, n_classes = ctx.work_dir / "segment", cfg.train.image_size, len(data.classes)
    cache = ctx.work_dir / "cache"
    images_key, test_key = content_key(data.train.paths), content_key(data.test.paths)
    images = cached_decode(cache, images_key, data.train.paths, size, 3, "segment-train")
    m_key = masks_key(data, ctx.data_dir / cfg.data.train_csv)
    masks = mask_array(data, cache, m_key, size)
    held_classes = presence(masks)

    n_splits, seed = cfg.folds.n_splits, cfg.train.seed
    groups = image_groups(data.train.ids, clean_csv(ctx.work_dir))
    fold = assign_folds(groups, presence_strata(held_classes, n_splits), n_splits, seed, key="segment.folds.n_splits")
    write_csv(root / "folds.csv", pd.DataFrame({"image": data.train.ids, "group": groups, "fold": fold}))
    folds = [(np.flatnonzero(fold == k), np.flatnonzero(fold != k)) for k in range(n_splits)]  # held (sorted), rest
    base_keys = [fingerprint(images_key, m_key, size, "fold", k, n_splits, [data.train.ids[i] for i in held])
                 for k, (held, _) in enumerate(folds)]
    members = [_member(ctx, member, base_keys, folds, images, masks, n_classes, rt) for member in cfg.models]

    # the blend: every candidate's Dice at 0.5 per image and class in one pass over the members' OOF maps, chosen on
    # all of OOF (the submission) and, per fold, on the other folds (the honest figure)
    oofs = [m.oof for m in members]
    weights = candidate_weights(len(members), cfg.blend.steps)
    scores = blend_scores(oofs, masks, weights)
    chosen = choose_blend(scores)
    _, per_fold = nested_blend(scores, fold)
    if len(members) > 1:
        log.info(f"segment: blend chosen on OOF Dice at 0.5 ({len(weights)} candidates): "
                 f"{_text(members, weights[chosen])} ({scores[chosen].mean():.4f}; alone: "
                 + ", ".join(f"{m.cfg.label} {scores[i].mean():.4f}" for i, m in enumerate(members)) + ")")
    # post-processing tables of the blends the choices need: the chosen one, each fold's, and each member alone
    grid = cfg.thresholds
    needed = {chosen, *per_fold.values(), *(range(len(members)) if len(members) > 1 else ())}
    tables = {i: [grid_scores(Blended(oofs, weights[i]).of_class(c), masks[:, c], grid.probability, grid.min_area)
                  for c in range(n_classes)] for i in sorted(needed)}
    post = _post_choice(grid, tables, chosen, per_fold, fold)
    member_post = [_post_choice(grid, tables, i, dict.fromkeys(per_fold, i), fold) if len(members) > 1 else post
                   for i in range(len(members))]
    thresholds, areas = post["thresholds"], post["areas"]
    metrics, board = _report(data.classes, members, weights, scores, chosen, per_fold, post, member_post, fold)

    def assemble(tmp: Path) -> None:  # the chosen blend's OOF maps, chunk by chunk
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(data.train), n_classes, size, size))
        blended = Blended(oofs, weights[chosen])
        for start in range(0, len(out), cfg.predict.chunk):
            out[start:start + cfg.predict.chunk] = blended[start:start + cfg.predict.chunk]
        out.flush()

    oof_all = _predicted(root, "oof", fingerprint("segment-oof-blend", [m.oof_key for m in members],
                                                  weights[chosen].tolist()), assemble)

    leaderboard = pd.DataFrame(board)
    write_csv(root / "leaderboard.csv", leaderboard)
    write_json(root / "metrics.json", metrics)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        log.info("segment: leaderboard (OOF: each training image predicted by the fold model that did not train "
                 "on it)\n" + leaderboard.to_string(index=False))
    log.info(f"segment: OOF Dice {metrics['oof_dice_0.5']:.4f} at threshold 0.5, {metrics['oof_dice_chosen']:.4f} "
             f"with thresholds {thresholds} and min areas {areas} chosen on OOF, nested (honest) "
             f"{metrics['nested_dice']:.4f}")

    n = min(cfg.predict.gallery_images, len(data.train))
    if n:
        shown = np.stack([np.stack([drop_small((oof_all[i, c] >= thresholds[c] * 255)[None], areas[c])[0]
                                    for c in range(n_classes)]) for i in range(n)])
        gallery(np.asarray(images[:n]), np.asarray(masks[:n]), shown, data.train.ids[:n], data.classes,
                root / "gallery_oof.png")

    # test maps only for the members the blend uses; each fold model is loaded only when its maps are stale
    test_images = cached_decode(cache, test_key, data.test.paths, size, 3, "segment-test")
    used = [i for i, w in enumerate(weights[chosen]) if w > 0]
    tests = [[_predicted(out, "test", fingerprint("segment-test", fp, members[i].views, test_key),
                         _write_npy(test_images, None, _loader(members[i].cfg, n_classes, rt, out), members[i].views,
                                    cfg.train.batch_size, rt, True, n_classes, size))
              for out, fp in ((members[i].root / f"fold{k}", fp) for k, fp in enumerate(members[i].fps))]
             for i in used]
    frame = _submission(ctx, data, tests, weights[chosen][used], thresholds, areas)
    manifest = {"track": "segmentation", "members": [{"name": m.cfg.label, "arch": m.cfg.arch,
                                                      "encoder": m.cfg.encoder, "views": list(m.views)}
                                                     for m in members],
                "weights": metrics["weights"], "folds": n_splits, "thresholds": metrics["thresholds"],
                "min_area": metrics["min_area"], "classes": data.classes,
                "oof_dice_chosen": metrics["oof_dice_chosen"], "nested_dice": metrics["nested_dice"],
                "config_hash": config_hash(cfg)}
    path = write_submission(frame, ctx.submissions_dir, ctx.name, manifest,
                            partial(validate_segmentation, data=data))
    log.info(f"segment: submission {path} ({len(frame)} rows, {data.submission_form} form); "
             f"{root}/leaderboard.csv, metrics.json, gallery_oof.png")
    return metrics
