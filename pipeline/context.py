"""What every stage receives: the resolved config and the folders it reads and writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd

from . import experiments, tasks
from .artifacts import write_text
from .competition import Competition, read_competition, resolve_task
from .config import Config, to_yaml
from .errors import PipelineError
from .experiments import Experiment


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
        """competition.task and competition.metric `auto` made concrete (pipeline/tasks.py), the decision printed
        once; so every stage, and every key that holds the metric, sees the task and metric actually used. A
        folder without its CSVs, or whose CSVs do not read, keeps `auto` (the stage that reads it says what is
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
            print(f"competition: task {task}: {reason} (competition.task=auto)")
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
