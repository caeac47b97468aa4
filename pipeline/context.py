"""What every stage receives: the resolved config and the folders it reads and writes."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.core import experiments
from pipeline.core.artifacts import write_text
from pipeline.core.config import Config, to_yaml
from pipeline.core.errors import PipelineError
from pipeline.core.experiments import Experiment
from pipeline.data import cache
from pipeline.data.competition import Competition, read_competition, resolve_task
from pipeline.scoring import predictions, tasks
from pipeline.training import cluster, parallel, runtime, tracking
from pipeline.training.fold import FoldSettings, TrainingData, load_training_data
from pipeline.training.inference import PredictSettings

log = logging.getLogger(__name__)


@dataclass
class Context:
    cfg: Config
    data_dir: Path
    work_dir: Path | None = None
    submissions_dir: Path = field(default_factory=lambda: Path("submissions"))
    resolve: bool = True  # decide competition.task/metric `auto` (the detection track has neither)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.work_dir is None:
            self.work_dir = Path("work") / self.name
        self.work_dir = Path(self.work_dir)
        self.submissions_dir = Path(self.submissions_dir)
        if self.resolve:
            self._resolve_task()

    def _resolve_task(self) -> None:
        """competition.task and competition.metric `auto` made concrete (data/labels.py decides the task), the
        decision printed once; so every stage, and every key that holds the metric, sees the task and metric actually
        used. A folder without its CSVs, or whose CSVs do not read, keeps `auto` (the stage that reads it says what is
        wrong, in its place)."""
        comp = self.cfg.competition
        if comp.task != "auto" and comp.metric != "auto":
            tasks.check_metric(comp.task, comp.metric)
            return
        if comp.task == "auto":
            if not (self.data_dir / comp.train_csv).is_file() or not (self.data_dir / comp.test_csv).is_file():
                return
            try:
                task, reason = resolve_task(self.data_dir, comp)
            except PipelineError:
                return
            log.info(f"competition: task {task}: {reason} (competition.task=auto)")
        else:
            task = comp.task
        metric = tasks.DEFAULT_METRIC[task] if comp.metric == "auto" else comp.metric
        tasks.check_metric(task, metric)
        self.cfg = self.cfg.model_copy(update={"competition": comp.model_copy(update={"task": task, "metric": metric})})

    @property
    def name(self) -> str:
        return self.cfg.competition.name or self.data_dir.resolve().name

    @cached_property
    def competition(self) -> Competition:
        return read_competition(self.data_dir, self.cfg.competition)

    def selected_experiments(self) -> list[Experiment]:
        """The experiments this run trains and predicts: all of model.backbones, or those model.only names."""
        return experiments.selected(self.cfg.model, self.cfg.train, self.cfg.predict)

    def configured_experiments(self) -> dict[str, Experiment]:
        """name -> experiment of every model this config makes: the selected experiments and the rounds' ones."""
        cfg = self.cfg
        later = experiments.round_experiments(cfg.model, cfg.train, cfg.predict, cfg.rounds.plan)  # rounds 2, 3, ...
        return {e.name: e for e in self.selected_experiments() + [e for r in later for e in r]}

    def find_predictions(self, folds_hash: str, classes: list[str]) -> dict[str, tuple]:
        """name -> (OOF frame, test frame, folder) of the models the ensemble may blend (predictions.find_predictions):
        this config's experiments, and with ensemble.include_other any other under WORK."""
        configured = [f"runs/{name}" for name in self.configured_experiments()]
        return predictions.find_predictions(self.work_dir, configured, self.cfg.ensemble.include_other, folds_hash,
                                            classes)

    def write_experiments_table(self, honest: dict[str, float] | None = None) -> pd.DataFrame:
        """WORK/experiments.csv from what the stages wrote so far (experiments.write_table)."""
        cfg = self.cfg
        return experiments.write_table(cfg.model, cfg.train, cfg.predict, cfg.rounds.plan, self.work_dir, honest)

    def for_experiment(self, exp: Experiment) -> Context:
        """This context with the experiment's resolved model, train and predict sections (the competition read once)."""
        cfg = self.cfg.model_copy(update={"model": exp.model, "train": exp.train, "predict": exp.predict})
        out = Context(cfg, self.data_dir, self.work_dir, self.submissions_dir)
        if "competition" in self.__dict__:
            out.__dict__["competition"] = self.competition
        return out

    def save_config(self) -> Path:
        """The resolved config, beside the artifacts it produces."""
        return write_text(self.work_dir / "config.yaml", to_yaml(self.cfg))

    def lock_path(self, name: str) -> Path:
        """WORK/locks/<name>.lock: the lock of a stage that writes shared files (core/locks.py)."""
        return self.work_dir / "locks" / f"{name}.lock"

    def parallel_workers(self, runs: int) -> list[parallel.Worker]:
        """The worker processes of runtime.parallel_runs for `runs` runs to do, planned on this machine's GPUs or
        cores (no more workers than runs); none for one run or fewer, when one run at a time is asked for, or inside
        a worker (a worker never starts workers). With runtime.cluster, one Ray task per run to do unless
        runtime.parallel_runs caps them."""
        rcfg = self.cfg.runtime
        if parallel.in_worker():
            return []
        if rcfg.cluster:
            n = runs if rcfg.parallel_runs == 1 else min(rcfg.parallel_runs, runs)
            return [parallel.Worker(i + 1, rcfg.cluster_cpus, None) for i in range(n)]
        n = min(rcfg.parallel_runs, runs)
        if n <= 1:
            return []
        gpus = torch.cuda.device_count() if rcfg.device != "cpu" else 0
        return parallel.plan(n, gpus, runtime.cores_per_process())

    def run_workers(self, stage: str, workers: list[parallel.Worker]) -> None:
        """`stage` in each worker process (or Ray task) on this WORK with this resolved config (a file beside the
        locks, removed after), so every worker computes the same run keys as this process."""
        work = self.work_dir.resolve()
        path = work / "locks" / f"workers-{os.getpid()}.yaml"
        write_text(path, to_yaml(self.cfg))
        args = [stage, "--data", str(self.data_dir.resolve()), "--work", str(work), "--submissions",
                str(self.submissions_dir.resolve()), "--config", str(path), "--no-tuned"]
        rcfg = self.cfg.runtime
        try:
            if rcfg.cluster:
                gpus = {"cpu": 0, "cuda": 1}.get(rcfg.device)  # auto: one when the cluster has GPUs
                cluster.run_tasks(rcfg.cluster, args, len(workers), work, rcfg.cluster_cpus, gpus,
                                  rcfg.cluster_memory_gb, stage, log.info)
            else:
                parallel.run_workers(args, workers, stage, log.info)
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # --- the typed arguments library functions take, made from this context --------------------------------

    def input_channels(self) -> int:
        """1 for all-grayscale competitions under competition.channels=auto, else 3."""
        return cache.input_channels(self.cfg.competition.channels, self.work_dir / "clean.json")

    def decoded_images(self, paths: list[str], size: int, channels: int, desc: str) -> np.ndarray:
        """(N, size, size, channels) uint8 for `paths`, from WORK/cache when already built."""
        return cache.decoded_images(self.work_dir / "cache", paths, size, channels, desc, self.cfg.clean.max_pixels)

    def training_data(self, shared: dict | None = None) -> TrainingData:
        """folds.csv and the decoded images at this experiment's image size (`shared`: one per size)."""
        return load_training_data(self.work_dir, self.cfg.train.image_size, self.input_channels(),
                                  self.cfg.clean.max_pixels, shared)

    def with_pseudo(self, plain: TrainingData, rows: pd.DataFrame) -> TrainingData:
        """The training data of a round experiment or a student: `plain` plus `rows` of test images as pseudo rows
        (TrainingData.with_pseudo), decoded at this experiment's size."""
        test_paths = list(self.competition.test["path"])
        test_images = self.decoded_images(test_paths, self.cfg.train.image_size, plain.channels, "test")
        return plain.with_pseudo(rows, test_paths, test_images)

    def tracking_settings(self) -> tracking.Settings:
        """Where this run's training runs are logged (tracking.*; the experiment defaults to the competition's name)."""
        track = self.cfg.tracking
        return tracking.Settings(track.backend, track.uri, track.experiment or self.name, self.work_dir)

    def fold_settings(self, runs_root: Path | None = None, stage: str = "train") -> FoldSettings:
        """What train_fold reads of this (experiment's) context; runs_root replaces WORK/runs (tuning trials)."""
        cfg, comp = self.cfg, self.cfg.competition
        return FoldSettings(cfg.model, cfg.train, cfg.runtime, comp.task, comp.metric, comp.label_separator,
                            runs_root or self.work_dir / "runs", to_yaml(cfg),
                            self.tracking_settings(),
                            self.name, stage)

    def predict_settings(self) -> PredictSettings:
        """What predict_experiment reads of this (experiment's) context."""
        cfg, comp = self.cfg, self.cfg.competition
        return PredictSettings(cfg.predict, cfg.runtime, cfg.train.folds, comp.task, comp.metric,
                               comp.label_separator, self.work_dir / "runs", self.work_dir / "cache",
                               cfg.clean.max_pixels)
