"""Train stage: every experiment on every fold, fine-tuning set-up, then the loop in pipeline/engine.py.

An experiment (pipeline/experiments.py) is a backbone with its own resolved train and model keys;
a bare backbone name is an experiment of that name. Per (experiment, fold) it writes under
WORK/runs/<experiment>/fold<k>/: best.safetensors (weights of
the best epoch, the EMA's when on), best.json (stamp + metadata: classes, folds hash, config hash,
epoch, metric, normalisation), last.safetensors + last.pt (resume state), history.csv, curves.png
and the resolved config. A finished run is skipped; an interrupted one resumes. A table of the
best metric per experiment and fold ends the stage, and WORK/experiments.csv is brought up to date.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel

from . import distributed, pseudo, runtime, tasks, tracking
from .artifacts import (
    content_key,
    file_digest,
    fingerprint,
    is_done,
    read_json,
    read_stamp,
    write_csv,
    write_stamp,
    write_text,
)
from .cache import decoded_images, input_channels
from .config import config_hash, to_yaml
from .context import Context
from .engine import FoldData, Trainer, auto_batch_size
from .errors import PipelineError
from .models import dataset_norm, input_norm, make_optimizer, param_groups, prepare_model, pretrained_file
from .plots import plot_curves


def train_fold(ctx: Context, backbone: str, fold: int, data: dict, on_epoch=None, runs_root: Path | None = None,
               name: str | None = None) -> dict:
    """Train one backbone on one fold (resuming from its last epoch); skipped when its stamp matches.

    ctx.cfg holds the experiment's resolved sections (Context.for_experiment), so the key covers them;
    `name` is the experiment's folder (default: the backbone). on_epoch(epoch, val_metric) is called
    after each epoch (tuning reports there); runs_root replaces WORK/runs (tuning trials train elsewhere).
    """
    cfg, tcfg = ctx.cfg, ctx.cfg.train
    label = name or backbone
    run_dir = (runs_root or ctx.work_dir / "runs") / label / f"fold{fold}"
    weights = file_digest(pretrained_file(cfg.model.pretrained_path, backbone)) if cfg.model.pretrained_path else None
    unread = {"folds"} | ({"loss"} if cfg.competition.task == "single_label" else set())  # loss: numbers only
    fp = fingerprint("train", data["folds_hash"], data["images_key"], backbone, fold, data["channels"],
                     cfg.competition.metric, cfg.model.model_dump(exclude={"backbones", "only"}),
                     tcfg.model_dump(exclude=unread),
                     runtime.result_keys(cfg.runtime), weights,
                     *([data["pseudo_keys"].get(fold)] if "pseudo_keys" in data else []))  # rounds: this fold's rows
    if is_done(run_dir / "best.json", fp):
        meta = read_json(run_dir / "best.json", "delete it and rerun `make train`")
        distributed.say(f"train: {label} fold {fold} up to date ({cfg.competition.metric} {meta['metric']:.4f})")
        return meta
    frame, images = data["frame"], data["images"]
    is_val = (frame["fold"] == fold).to_numpy()
    is_train = training_rows(frame, fold)
    seed = tcfg.seed * 1000 + fold
    torch.manual_seed(seed)
    rt = runtime.from_config(cfg.runtime, "classification")
    mcfg = cfg.model
    task, sep = cfg.competition.task, cfg.competition.label_separator
    y = tasks.targets(task, frame, data["classes"], sep)
    head = tasks.make_head(task, len(data["classes"]), tcfg.loss, y[is_train])
    model, fine_tuning = prepare_model(backbone, head.n_out, data["channels"], pretrained=mcfg.pretrained,
                                       pretrained_path=mcfg.pretrained_path, drop_rate=mcfg.drop_rate,
                                       freeze_prefixes=mcfg.freeze, say=distributed.say)
    model = rt.prepare(model)
    cuda = rt.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)  # best.json's peak_gpu_gb is this run's
    net = model
    if distributed.world_size() > 1:
        net = DistributedDataParallel(model, device_ids=[rt.device.index] if cuda else None)
    if "norm" not in data:  # one pass over the images per stage run, and none when every fold is done
        data["norm"] = dataset_norm(data["images"])
    norm = input_norm(tcfg.normalize, fine_tuning, data["channels"], data["norm"])
    groups = param_groups(model, tcfg.lr, tcfg.weight_decay, cfg.model.head_lr_mult if fine_tuning else 1.0)
    optimizer = make_optimizer(tcfg.optimizer, groups, tcfg.lr, tcfg.momentum, tcfg.nesterov)
    train_y = y[is_train] if "soft" not in data else \
        pseudo.dense_targets(y[is_train], data["soft"][is_train], len(data["classes"]))  # rounds, soft labels
    fold_data = FoldData(images[is_train], train_y, images[is_val], y[is_val],
                         len(data["classes"]), norm, cfg.competition.metric, None if task == "single_label" else head)
    if tcfg.batch_size == "auto":  # the stamp keeps "auto" (the config asked for it); best.json records the size
        tcfg = tcfg.model_copy(update={"batch_size": _auto_batch(run_dir, fp, model, optimizer, fold_data, rt)})
    net = torch.compile(net) if rt.compile else net
    trainer = Trainer(model, optimizer, tcfg, fold_data, run_dir, fp, rt, seed, desc=f"{label} fold {fold}", net=net,
                      on_epoch=on_epoch)
    track = _start_tracking(ctx, label, backbone, fold, run_dir, fp, "tune" if runs_root else "train")
    try:
        result = trainer.fit()
    except BaseException as exc:
        track.stop(exc)
        raise
    if not distributed.is_main():
        distributed.barrier()  # rank 0 writes the run's files; every rank then sees the same stamp
        return {"metric": result["metric"]}
    history = pd.DataFrame(result["history"])
    write_csv(run_dir / "history.csv", history)
    plot_curves(history, run_dir / "curves.png", f"{label} fold {fold}")
    write_text(run_dir / "config.yaml", to_yaml(cfg))
    meta = {"experiment": label, "backbone": backbone, "fold": fold, "epoch": result["epoch"],
            "epochs_run": result["epochs_run"], "metric": result["metric"],
            "metric_name": cfg.competition.metric, "greater_is_better": tasks.greater_is_better(cfg.competition.metric),
            "classes": data["classes"], "folds_hash": data["folds_hash"], "config_hash": config_hash(cfg.model, tcfg),
            "in_chans": data["channels"], "image_size": tcfg.image_size, "norm": norm, "drop_rate": cfg.model.drop_rate,
            "ema": tcfg.ema, "fine_tuned": fine_tuning, "n_params": sum(p.numel() for p in model.parameters()),
            "batch_size": tcfg.batch_size, "augment_device": "cpu" if trainer.device_augment is None else "gpu",
            "num_workers": rt.num_workers, "peak_gpu_gb": _rounded(runtime.peak_gpu_gb(rt.device)),
            "peak_rss_gb": _rounded(runtime.peak_rss_gb()),
            **({} if task == "single_label" else {"task": task, "head": head.to_meta()})}
    track.finish(result["history"], [run_dir / "history.csv", run_dir / "curves.png"])  # before the stamp (tracking.py)
    write_stamp(run_dir / "best.json", fp, **meta)
    distributed.barrier()
    return meta


def _auto_batch(run_dir: Path, fp: str, model, optimizer, data: FoldData, rt: runtime.Runtime) -> int:
    """train.batch_size=auto, searched once per run: a resumed run keeps the size it started with (its schedule
    and its resume state count that size's batches), kept in batch_size.json beside last.pt."""
    path = run_dir / "batch_size.json"
    kept = read_stamp(path)
    if kept and kept.get("fingerprint") == fp and (run_dir / "last.pt").exists():
        distributed.say(f"train: batch_size auto: {kept['batch_size']} (kept from the run's start)")
        return int(kept["batch_size"])
    batch = auto_batch_size(model, optimizer, data, rt, distributed.say)
    if distributed.is_main():
        write_stamp(path, fp, batch_size=batch)
    return batch


def _rounded(gb: float | None) -> float | None:
    return None if gb is None else round(gb, 3)


def training_rows(frame: pd.DataFrame, fold: int) -> np.ndarray:
    """Fold `fold`'s training rows: every row of another fold (extra rows, fold -1, included) except pseudo rows
    made for another fold's model (rounds: a row with `pseudo_fold` j trains the fold-j model only)."""
    rows = np.array(frame["fold"] != fold)
    if "pseudo_fold" in frame.columns:
        rows &= (frame["pseudo_fold"].isna() | (frame["pseudo_fold"] == fold)).to_numpy()
    return rows


def _start_tracking(ctx: Context, experiment: str, backbone: str, fold: int, run_dir: Path, fp: str,
                    stage: str) -> tracking.Run:
    """This training's MLflow run (rank 0 only), with the resolved model and train keys as flat params."""
    tcfg = ctx.cfg.tracking
    if not distributed.is_main():
        return tracking.Run()
    settings = tracking.Settings(tcfg.backend, tcfg.uri, tcfg.experiment or ctx.name, ctx.work_dir)
    keys = {"model": ctx.cfg.model.model_dump(mode="json", exclude={"backbones"}),
            "train": ctx.cfg.train.model_dump(mode="json")}
    params = {"experiment": experiment, "backbone": backbone, "fold": fold, **tracking.flatten(keys)}
    tags = {"stage": stage, "experiment": experiment, "backbone": backbone, "fold": str(fold), "competition": ctx.name}
    return tracking.start(settings, run_dir, f"{experiment}-fold{fold}", fp, params, tags)


def load_training_data(ctx: Context, shared: dict | None = None) -> dict:
    """folds.csv, its stamp and the decoded-image cache at ctx's image size: what every fold run shares.
    `shared` (image size -> data) keeps one per size across experiments, with its input statistics."""
    size = ctx.cfg.train.image_size
    if shared is not None and size in shared:
        return shared[size]
    stamp = read_json(ctx.work_dir / "folds.json", "run `make folds`")
    frame = pd.read_csv(ctx.work_dir / "folds.csv", dtype={"id": str, "label": str}, keep_default_na=False)
    channels = input_channels(ctx)
    images = decoded_images(ctx, list(frame["path"]), size, channels, "train")
    data = {"frame": frame, "images": images, "images_key": content_key(frame["path"]), "channels": channels,
            "classes": stamp["classes"], "folds_hash": stamp["folds_hash"], "n_splits": stamp["n_splits"]}
    if shared is not None:
        shared[size] = data
    return data


def folds_to_train(requested: list[int] | None, n_splits: int) -> list[int]:
    chosen = list(range(n_splits)) if requested is None else requested
    bad = [k for k in chosen if not 0 <= k < n_splits]
    if bad:
        raise PipelineError(f"train.folds: folds {bad} do not exist; folds run from 0 to {n_splits - 1}")
    return chosen


def run(ctx: Context) -> dict:
    """Every experiment on every fold (the folds stage must be done: pipeline/orchestrate.py runs it first)."""
    _, world = distributed.setup()
    chosen = [(exp, ctx.for_experiment(exp)) for exp in ctx.selected_experiments()]
    if distributed.is_main():  # one process fills the image caches; the others wait
        for _, ectx in chosen:
            load_training_data(ectx)
    distributed.barrier()
    runtime.set_threads(ctx.cfg.runtime.threads)
    if world > 1 and distributed.is_main():
        print(f"train: distributed over {world} processes ({distributed.backend()})")
    shared: dict = {}
    results = {}
    for exp, ectx in chosen:
        data = load_training_data(ectx, shared)
        for fold in folds_to_train(ctx.cfg.train.folds, data["n_splits"]):
            results[(exp.name, fold)] = train_fold(ectx, exp.backbone, fold, data, name=exp.name)["metric"]
    if not distributed.is_main():
        return results
    table = pd.Series(results).unstack()
    table.columns = [f"fold{k}" for k in table.columns]
    table = table.assign(mean=table.mean(axis=1)).to_string(float_format=lambda v: f"{v:.4f}")
    print(f"train: best val {ctx.cfg.competition.metric} per experiment and fold\n{table}")
    ctx.write_experiments_table()
    return results
