"""One (experiment, fold) training: the fine-tuning set-up around the Trainer, its stamp and its files.

Per run it writes under <runs_root>/<experiment>/fold<k>/: best.safetensors (weights of the best epoch, the
EMA's when on), best.json (stamp + metadata: classes, folds hash, config hash, epoch, metric, normalisation),
last.safetensors + last.pt (resume state), history.csv, curves.png and the resolved config. A finished run is
skipped (its stamp matches); an interrupted one resumes. The train, rounds and tune stages call `train_fold`
with a `FoldSettings` (the experiment's resolved sections) and one `TrainingData` per image size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from pipeline.core.artifacts import (
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
from pipeline.core.config import ModelConfig, RuntimeConfig, TrainConfig, config_hash
from pipeline.core.errors import PipelineError
from pipeline.data.cache import decoded_images
from pipeline.scoring import pseudo, tasks
from pipeline.scoring.predictions import prob_columns
from pipeline.training import distributed, runtime, tracking
from pipeline.training.batch_size import auto_batch_size
from pipeline.training.heads import make_head
from pipeline.training.models import (
    dataset_norm,
    input_norm,
    make_optimizer,
    param_groups,
    prepare_model,
    pretrained_file,
)
from pipeline.training.plots import plot_curves
from pipeline.training.trainer import FoldData, Trainer


@dataclass(frozen=True)
class FoldSettings:
    """What one experiment's fold trainings read: its resolved sections, the task, and where runs go."""

    model: ModelConfig
    train: TrainConfig
    runtime: RuntimeConfig
    task: str
    metric: str
    label_separator: str
    runs_root: Path  # WORK/runs, or a tuning trial's folder
    config_yaml: str  # the resolved config, saved beside each run
    tracking: tracking.Settings
    competition: str  # the competition's name (a tracking tag)
    stage: str = "train"  # the tracking tag: train, or tune for trials
    # fold -> a finished run folder of the same backbone, classes and channels whose best weights (head included)
    # and input norm the fold's run starts from (make distill: the fold-k teacher, trained on the same rows)
    init_from: dict[int, Path] | None = None


def _init_run(settings: FoldSettings, fold: int) -> Path | None:
    return (settings.init_from or {}).get(fold)


PSEUDO_FOLD = -2  # the fold of pseudo rows: never a validation fold; `pseudo_fold` says which model trains on them


@dataclass
class TrainingData:
    """What every fold run of one image size shares: folds.csv, its stamp, the decoded images and, once computed,
    the images' channel statistics. Rounds add pseudo rows (fold PSEUDO_FOLD) with per-fold keys and, for soft
    labels, one target row per frame row."""

    frame: pd.DataFrame
    images: np.ndarray
    images_key: str
    channels: int
    classes: list[str]
    folds_hash: str
    n_splits: int
    norm: dict | None = None
    pseudo_keys: dict[int, str] | None = None
    soft: np.ndarray | None = None

    def input_stats(self) -> dict:
        """The images' per-channel statistics, computed on first use (none when every fold is done)."""
        if self.norm is None:
            self.norm = dataset_norm(self.images)
        return self.norm

    def with_pseudo(self, rows: pd.DataFrame, test_paths: list[str], test_images: np.ndarray) -> TrainingData:
        """These rows plus pseudo rows (fold PSEUDO_FOLD; `pseudo_fold` k: only the fold-k model trains on them):
        `rows` has id, path (a test image), label and fold k, and for soft labels the probability columns; the
        images come from `test_images` (decoded at this data's size and channels, in `test_paths` order). Per fold the
        key of that fold's pseudo rows; the input statistics stay the competition's own."""
        norm = self.input_stats()
        position = {p: i for i, p in enumerate(test_paths)}
        index = {c: i for i, c in enumerate(self.classes)}
        added = pd.DataFrame({"id": rows["id"].astype(str), "path": rows["path"], "label": rows["label"].astype(str),
                              "y": rows["label"].astype(str).map(index).to_numpy(), "fold": PSEUDO_FOLD,
                              "pseudo_fold": rows["fold"].to_numpy()})
        frame = pd.concat([self.frame.assign(pseudo_fold=np.nan), added], ignore_index=True)
        picked = np.asarray([position[p] for p in rows["path"]], dtype=int)
        images = np.concatenate([np.asarray(self.images), np.asarray(test_images)[picked]])
        cols = [c for c in prob_columns(self.classes) if c in rows.columns]  # soft labels: the target vectors
        keys = {int(k): fingerprint(part[["id", "path", "label", *cols]].to_numpy().tolist())
                for k, part in rows.groupby("fold")}
        soft = None
        if cols:  # one target row per frame row: NaN (the one-hot label) for the competition's rows
            soft = np.full((len(frame), len(self.classes)), np.nan, dtype=np.float32)
            soft[len(self.frame):] = rows[cols].to_numpy(np.float32)
        return replace(self, frame=frame, images=images, norm=norm, pseudo_keys=keys, soft=soft)


def load_training_data(work_dir: Path, image_size: int, channels: int, max_pixels: int,
                       shared: dict[int, TrainingData] | None = None) -> TrainingData:
    """folds.csv, its stamp and the decoded-image cache at `image_size`; `shared` (image size -> data) keeps one
    per size across experiments, with its input statistics."""
    if shared is not None and image_size in shared:
        return shared[image_size]
    stamp = read_json(work_dir / "folds.json", "run `make folds`")
    frame = pd.read_csv(work_dir / "folds.csv", dtype={"id": str, "label": str}, keep_default_na=False)
    images = decoded_images(work_dir / "cache", list(frame["path"]), image_size, channels, "train", max_pixels)
    data = TrainingData(frame, images, content_key(frame["path"]), channels, stamp["classes"], stamp["folds_hash"],
                        stamp["n_splits"])
    if shared is not None:
        shared[image_size] = data
    return data


def folds_to_train(requested: list[int] | None, n_splits: int) -> list[int]:
    """train.folds checked against the split: every fold when None."""
    chosen = list(range(n_splits)) if requested is None else requested
    bad = [k for k in chosen if not 0 <= k < n_splits]
    if bad:
        raise PipelineError(f"train.folds: folds {bad} do not exist; folds run from 0 to {n_splits - 1}")
    return chosen


def training_rows(frame: pd.DataFrame, fold: int) -> np.ndarray:
    """Fold `fold`'s training rows: every row of another fold (extra rows, fold -1, included) except pseudo rows
    made for another fold's model (rounds: a row with `pseudo_fold` j trains the fold-j model only)."""
    rows = np.array(frame["fold"] != fold)
    if "pseudo_fold" in frame.columns:
        rows &= (frame["pseudo_fold"].isna() | (frame["pseudo_fold"] == fold)).to_numpy()
    return rows


def run_key(settings: FoldSettings, backbone: str, fold: int, data: TrainingData) -> str:
    """The fingerprint of one (experiment, fold) training: everything that changes its weights."""
    mcfg, tcfg = settings.model, settings.train
    weights = file_digest(pretrained_file(mcfg.pretrained_path, backbone)) if mcfg.pretrained_path else None
    init = _init_run(settings, fold)
    if init is not None:  # its weights and the norm it trained with
        start = read_json(init / "best.json", f"retrain {init}")
        weights = [weights, file_digest(init / "best.safetensors"), start["norm"]]
    unread = {"folds"} | ({"loss"} if settings.task == "single_label" else set())  # loss: numbers only
    return fingerprint("train", data.folds_hash, data.images_key, backbone, fold, data.channels,
                       settings.metric, mcfg.model_dump(exclude={"backbones", "only"}),
                       tcfg.model_dump(exclude=unread),
                       runtime.result_keys(settings.runtime), weights,
                       *([data.pseudo_keys.get(fold)] if data.pseudo_keys is not None else []))  # rounds: this fold's


def is_trained(settings: FoldSettings, backbone: str, fold: int, data: TrainingData, name: str | None = None) -> bool:
    """Whether train_fold would skip this run (its stamp matches)."""
    run_dir = settings.runs_root / (name or backbone) / f"fold{fold}"
    return is_done(run_dir / "best.json", run_key(settings, backbone, fold, data))


def train_fold(settings: FoldSettings, backbone: str, fold: int, data: TrainingData, on_epoch=None,
               name: str | None = None) -> dict:
    """Train one backbone on one fold (resuming from its last epoch); skipped when its stamp matches.

    `name` is the experiment's folder (default: the backbone); on_epoch(epoch, val_metric) is called after each
    epoch (tuning reports there).
    """
    mcfg, tcfg = settings.model, settings.train
    label = name or backbone
    run_dir = settings.runs_root / label / f"fold{fold}"
    fp = run_key(settings, backbone, fold, data)
    if is_done(run_dir / "best.json", fp):
        meta = read_json(run_dir / "best.json", "delete it and rerun `make train`")
        distributed.say(f"train: {label} fold {fold} up to date ({settings.metric} {meta['metric']:.4f})")
        return meta
    frame, images = data.frame, data.images
    is_val = (frame["fold"] == fold).to_numpy()
    is_train = training_rows(frame, fold)
    seed = tcfg.seed * 1000 + fold
    torch.manual_seed(seed)
    rt = runtime.from_config(settings.runtime, "classification")
    task = settings.task
    y = tasks.targets(task, frame, data.classes, settings.label_separator)
    head = make_head(task, len(data.classes), tcfg.loss, y[is_train])
    model, fine_tuning = prepare_model(backbone, head.n_out, data.channels, pretrained=mcfg.pretrained,
                                       pretrained_path=mcfg.pretrained_path, drop_rate=mcfg.drop_rate,
                                       freeze_prefixes=mcfg.freeze, say=distributed.say)
    init = _init_run(settings, fold)
    if init is not None:
        start = read_json(init / "best.json", f"retrain {init}")
        own = {"backbone": backbone, "classes": data.classes, "in_chans": data.channels, "folds_hash": data.folds_hash}
        other = [k for k in own if start[k] != own[k]]
        if other:
            raise PipelineError(f"{init}/best.json: starting weights of another {other[0]} ({start[other[0]]} != "
                                f"{own[other[0]]}); start this run from scratch or retrain {init}")
        model.load_state_dict(load_file(str(init / "best.safetensors")))
        distributed.say(f"train: {label} fold {fold} starts from {init}")
    model = rt.prepare(model)
    cuda = rt.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)  # best.json's peak_gpu_gb is this run's
    net = model
    if distributed.world_size() > 1:
        net = DistributedDataParallel(model, device_ids=[rt.device.index] if cuda else None)
    norm = start["norm"] if init is not None else input_norm(tcfg.normalize, fine_tuning, data.channels,
                                                                 data.input_stats())
    groups = param_groups(model, tcfg.lr, tcfg.weight_decay, mcfg.head_lr_mult if fine_tuning else 1.0)
    optimizer = make_optimizer(tcfg.optimizer, groups, tcfg.lr, tcfg.momentum, tcfg.nesterov)
    train_y = y[is_train] if data.soft is None else \
        pseudo.dense_targets(y[is_train], data.soft[is_train], len(data.classes))  # rounds, soft labels
    fold_data = FoldData(images[is_train], train_y, images[is_val], y[is_val],
                         len(data.classes), norm, settings.metric, None if task == "single_label" else head)
    if tcfg.batch_size == "auto":  # the stamp keeps "auto" (the config asked for it); best.json records the size
        tcfg = tcfg.model_copy(update={"batch_size": _auto_batch(run_dir, fp, model, optimizer, fold_data, rt)})
    net = torch.compile(net) if rt.compile else net
    trainer = Trainer(model, optimizer, tcfg, fold_data, run_dir, fp, rt, seed, desc=f"{label} fold {fold}", net=net,
                      on_epoch=on_epoch)
    track = _start_tracking(settings, label, backbone, fold, run_dir, fp)
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
    write_text(run_dir / "config.yaml", settings.config_yaml)
    meta = {"experiment": label, "backbone": backbone, "fold": fold, "epoch": result["epoch"],
            "epochs_run": result["epochs_run"], "metric": result["metric"],
            "train_rows": int(is_train.sum()),
            "metric_name": settings.metric, "greater_is_better": tasks.greater_is_better(settings.metric),
            "classes": data.classes, "folds_hash": data.folds_hash, "config_hash": config_hash(mcfg, tcfg),
            "in_chans": data.channels, "image_size": tcfg.image_size, "norm": norm, "drop_rate": mcfg.drop_rate,
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


def _start_tracking(settings: FoldSettings, experiment: str, backbone: str, fold: int, run_dir: Path,
                    fp: str) -> tracking.Run:
    """This training's MLflow run (rank 0 only), with the resolved model and train keys as flat params."""
    if not distributed.is_main():
        return tracking.Run()
    keys = {"model": settings.model.model_dump(mode="json", exclude={"backbones"}),
            "train": settings.train.model_dump(mode="json")}
    params = {"experiment": experiment, "backbone": backbone, "fold": fold, **tracking.flatten(keys)}
    tags = {"stage": settings.stage, "experiment": experiment, "backbone": backbone, "fold": str(fold),
            "competition": settings.competition}
    return tracking.start(settings.tracking, run_dir, f"{experiment}-fold{fold}", fp, params, tags)
