"""What every stage receives: the resolved config and the folders it reads and writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd

from . import experiments
from .artifacts import write_text
from .competition import Competition, read_competition
from .config import Config, to_yaml
from .experiments import Experiment


@dataclass
class Context:
    cfg: Config
    data_dir: Path
    work_dir: Path | None = None
    submissions_dir: Path = field(default_factory=lambda: Path("submissions"))

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.work_dir is None:
            self.work_dir = Path("work") / self.name
        self.work_dir = Path(self.work_dir)
        self.submissions_dir = Path(self.submissions_dir)

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
