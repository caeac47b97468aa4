"""What every stage receives: the resolved config and the folders it reads and writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .artifacts import write_text
from .competition import Competition, read_competition
from .config import Config, to_yaml


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

    def save_config(self) -> Path:
        """The resolved config, beside the artifacts it produces."""
        return write_text(self.work_dir / "config.yaml", to_yaml(self.cfg))
