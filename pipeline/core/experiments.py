"""Experiments: the named run specs of `model.backbones`, resolved against the base config, and their table.

An entry of `model.backbones` is a bare backbone name (an experiment of that name with no overrides)
or a spec `{name, backbone, seeds, image_sizes, train, model, predict}` (pipeline/core/config/specs.py checks
it). `resolve` turns the entries into experiments, each with its own complete train, model and
predict sections: the base sections with the entry's overrides, seed and size sweeps expanded into
one experiment each. The train and predict stages run each experiment with these sections, so their
keys cover the experiment's resolved values: two sizes or seeds of one backbone never share a key,
and editing one experiment reruns that experiment alone. Artifacts live under WORK/runs/<name>/.

`table` gathers one row per experiment from those artifacts (what differs from the base config,
OOF score, honest score, train time, epochs, parameters, when trained) for WORK/experiments.csv.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline.core.artifacts import read_stamp, write_csv
from pipeline.core.config import ExperimentSpec, ModelConfig, PredictConfig, RoundSpec, TrainConfig
from pipeline.core.errors import PipelineError


@dataclass(frozen=True)
class Experiment:
    name: str
    backbone: str
    model: ModelConfig
    train: TrainConfig
    predict: PredictConfig
    changes: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, where it differs from the base

    def describe_changes(self) -> str:
        return " ".join(f"{k}={_short(v)}" for k, v in self.changes.items())


def _short(value: Any) -> str:
    """The value as a dotted override takes it (YAML flow, no spaces after commas): predict.tta=[identity]."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip() \
        .replace(", ", ",")


def _diff(section: str, base: dict, resolved: dict) -> dict[str, Any]:
    return {f"{section}.{k}": v for k, v in resolved.items() if base.get(k) != v}


def resolve(model: ModelConfig, train: TrainConfig, predict: PredictConfig) -> list[Experiment]:
    """Every experiment of model.backbones, in order, with its resolved sections (names are unique: the config
    checked them)."""
    out = []
    base_model = model.model_dump(exclude={"backbones", "only"})
    base_train, base_predict = train.model_dump(), predict.model_dump()
    for entry in model.backbones:
        if isinstance(entry, str):
            out.append(Experiment(entry, entry, model.model_copy(update={"backbones": [entry], "only": None}),
                                  train, predict))
            continue
        assert isinstance(entry, ExperimentSpec)
        for name, train_override in entry.expand():
            sections = (ModelConfig.model_validate({**base_model, **entry.model, "backbones": [entry.backbone]}),
                        TrainConfig.model_validate({**base_train, **train_override}),
                        PredictConfig.model_validate({**base_predict, **entry.predict}))
            dumps = [s.model_dump() for s in sections]
            model_keys = {k: v for k, v in dumps[0].items() if k not in ("backbones", "only")}
            changes = {**_diff("model", base_model, model_keys),
                       **_diff("train", base_train, dumps[1]), **_diff("predict", base_predict, dumps[2])}
            out.append(Experiment(name, entry.backbone, *sections, changes=changes))
    return out


def select(experiments: list[Experiment], only: list[str] | None) -> list[Experiment]:
    """The experiments named in `only` (model.only, make EXP=...), or all of them."""
    if only is None:
        return experiments
    by_name = {e.name.lower(): e for e in experiments}
    missing = [n for n in only if n.lower() not in by_name]
    if missing:
        raise PipelineError(f"model.only: no experiment named {missing[0]!r}; the experiments are "
                            + ", ".join(e.name for e in experiments))
    return [by_name[n.lower()] for n in only]


def _train_facts(run_dir: Path) -> dict[str, Any]:
    """Train time, epochs, parameters and the finish time of an experiment's fold runs (blank before training)."""
    stamps = sorted(run_dir.glob("fold*/best.json"))
    metas = [m for m in (read_stamp(p) for p in stamps) if m is not None]
    if not metas:
        return {}
    seconds = 0.0
    for stamp in stamps:
        history = stamp.parent / "history.csv"
        if history.is_file():
            seconds += float(pd.read_csv(history)["seconds"].sum())
    epochs = sorted({int(m.get("epochs_run", m.get("epoch", 0))) for m in metas})
    params = {m["n_params"] for m in metas if "n_params" in m}
    finished = max(p.stat().st_mtime for p in stamps)
    return {"folds": len(metas), "epochs": str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}",
            "train_seconds": round(seconds, 1), "params": params.pop() if len(params) == 1 else None,
            "trained_at": dt.datetime.fromtimestamp(finished).isoformat(timespec="seconds")}


COLUMNS = ["experiment", "backbone", "changes", "cv_score", "honest_score", "train_seconds", "epochs", "folds",
           "params", "trained_at"]


def table(experiments: list[Experiment], runs_dir: Path, honest: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per experiment: its differences from the base config, OOF score (predict.json), honest score (the
    ensemble leaderboard's single-model row, when given), train time (sum of the folds' history seconds), epochs run
    per fold, parameters and when its last fold finished; blank where that stage has not run yet."""
    rows = []
    for exp in experiments:
        predicted = read_stamp(runs_dir / exp.name / "predict.json") or {}
        rows.append({"experiment": exp.name, "backbone": exp.backbone, "changes": exp.describe_changes(),
                     "cv_score": predicted.get("oof_score"), "honest_score": (honest or {}).get(exp.name),
                     **_train_facts(runs_dir / exp.name)})
    return pd.DataFrame(rows, columns=COLUMNS)


def format_table(frame: pd.DataFrame, metric: str) -> str:
    """The table as printed: scores to 4 decimals, seconds to 1, blanks where a stage has not run yet."""
    shown = frame.rename(columns={"cv_score": f"cv_{metric}", "honest_score": f"honest_{metric}"}).astype(object)
    formats = {f"cv_{metric}": "{:.4f}", f"honest_{metric}": "{:.4f}", "train_seconds": "{:.1f}", "folds": "{:.0f}",
               "params": "{:,.0f}"}
    for column, fmt in formats.items():
        shown[column] = [fmt.format(v) if pd.notna(v) else "" for v in shown[column]]
    return shown.where(shown.notna(), "").to_string(index=False)


def round_experiments(model: ModelConfig, train: TrainConfig, predict: PredictConfig,
                      plan: list[RoundSpec]) -> list[list[Experiment]]:
    """The experiments of rounds 2, 3, ... (rounds.plan), resolved against the same base sections as round 1."""
    return [resolve(model.model_copy(update={"backbones": spec.experiments, "only": None}), train, predict)
            for spec in plan]


def selected(model: ModelConfig, train: TrainConfig, predict: PredictConfig) -> list[Experiment]:
    """The experiments a run trains and predicts: all of model.backbones, or those model.only names."""
    return select(resolve(model, train, predict), model.only)


def write_table(model: ModelConfig, train: TrainConfig, predict: PredictConfig, plan: list[RoundSpec],
                work_dir: Path, honest: dict[str, float] | None = None) -> pd.DataFrame:
    """WORK/experiments.csv: one row per configured experiment (every round's), from what its stages wrote so far."""
    every = resolve(model, train, predict) + [e for r in round_experiments(model, train, predict, plan) for e in r]
    frame = table(every, Path(work_dir) / "runs", honest)
    write_csv(Path(work_dir) / "experiments.csv", frame)
    return frame
