"""Experiment entries: `model.backbones` and `rounds.plan` entries checked key by key, sweeps expanded to
named experiments, names unique across rounds; and `Config`, the whole tree, whose own check is that last one."""

from __future__ import annotations

from typing import Annotated, Any

import yaml
from pydantic import Discriminator, Field, Tag, ValidationError, model_validator

from pipeline.core.config.detect import DetectConfig
from pipeline.core.config.keys import suggestion
from pipeline.core.config.schema import (
    SAFE_NAME,
    AutoConfig,
    AutoGluonConfig,
    CleanConfig,
    CompetitionConfig,
    DistillConfig,
    EnsembleConfig,
    ExportConfig,
    FoldsConfig,
    PredictConfig,
    PseudoConfig,
    RuntimeConfig,
    Section,
    SpecError,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
)
from pipeline.core.config.segment import SegmentConfig

NOT_OVERRIDDEN = {"model": {"backbones", "only"}, "train": {"folds"}}  # run selection, not part of an experiment


class ExperimentSpec(Section):
    """One entry of model.backbones written out: a backbone plus overrides of the train/model/predict keys."""

    name: str | None = Field(None, description="folder name under WORK/runs; default: the backbone's name")
    backbone: str = Field(description="timm model name or a course net")
    seeds: list[int] | None = Field(None, min_length=1,
                                    description="sweep: one experiment per train.seed, named <name>-s<seed>")
    image_sizes: list[int] | None = Field(None, min_length=1,
                                          description="sweep: one experiment per train.image_size, "
                                                      "named <name>-<size>px")
    train: dict[str, Any] = Field({}, description="train keys that differ from the train section")
    model: dict[str, Any] = Field({}, description="model keys that differ from the model section")
    predict: dict[str, Any] = Field({}, description="predict keys that differ from the predict section")

    @property
    def label(self) -> str:
        return repr(self.name) if self.name else f"of backbone {self.backbone!r}"

    def check(self, where: str) -> None:
        """Every override is a real key of its section with a valid value; sweeps do not also set their key."""
        def fail(msg: str) -> SpecError:
            return SpecError(f"{where} (experiment {self.label}): {msg}")

        sections = {"train": (TrainConfig, self.train), "model": (ModelConfig, self.model),
                    "predict": (PredictConfig, self.predict)}
        for section, (model, override) in sections.items():
            banned = sorted(NOT_OVERRIDDEN.get(section, set()) & set(override))
            if banned:
                raise fail(f"'{section}.{banned[0]}' cannot differ per experiment; set it for the whole config")
            try:
                model.model_validate(override)
            except ValidationError as err:
                first = err.errors()[0]
                key = f"{section}." + ".".join(str(p) for p in first["loc"])
                if first["type"] == "extra_forbidden":
                    raise fail(f"unknown key '{key}'{suggestion(key, Config)}") from None
                raise fail(f"'{key}': {first['msg']} (got {first.get('input')!r})") from None
        for sweep, key in (("seeds", "seed"), ("image_sizes", "image_size")):
            if getattr(self, sweep) is not None and key in self.train:
                raise fail(f"give '{sweep}' or 'train.{key}', not both")
        for size in self.image_sizes or []:
            try:
                TrainConfig.model_validate({"image_size": size})
            except ValidationError as err:
                raise fail(f"'image_sizes': {err.errors()[0]['msg']} (got {size})") from None

    def expand(self) -> list[tuple[str, dict[str, Any]]]:
        """(experiment name, train overrides) per seed x image size: sweeps become experiments with derived names."""
        base = self.name or self.backbone
        out = []
        for size in self.image_sizes or [None]:
            for seed in self.seeds or [None]:
                name = base + (f"-{size}px" if size is not None else "") + (f"-s{seed}" if seed is not None else "")
                sweep = {k: v for k, v in (("image_size", size), ("seed", seed)) if v is not None}
                out.append((name, {**self.train, **sweep}))
        return out


def _entry_kind(value: Any) -> str:
    return "spec" if isinstance(value, dict | ExperimentSpec) else "name"


Entry = Annotated[Annotated[str, Tag("name")] | Annotated[ExperimentSpec, Tag("spec")], Discriminator(_entry_kind)]


def _describe(entry: str | ExperimentSpec, index: int) -> str:
    if isinstance(entry, str):
        return f"model.backbones[{index}] ({entry})"
    shown = entry.model_dump(exclude_defaults=True)
    return f"model.backbones[{index}] ({yaml.safe_dump(shown, default_flow_style=True, width=1000).strip()})"


class ModelConfig(Section):
    backbones: list[Entry] = Field(
        ["resnet18", "efficientnet_b0"], min_length=1,
        description="the experiments: timm model names or d2l's nets (d2l_lenet, d2l_alexnet, d2l_vgg11, "
                    "d2l_nin, d2l_googlenet, d2l_resnet18), or entries {name, backbone, seeds, image_sizes, train, "
                    "model, predict} (docs/training-and-experiments.md)")
    only: list[str] | None = Field(None, min_length=1,
                                   description="experiment names that train and predict run (make EXP=a,b); null: all")
    pretrained: bool = Field(False, description="load ImageNet weights from the hub (needs "
                                                "internet; offline use pretrained_path)")
    pretrained_path: str | None = Field(None, description="local safetensors or timm checkpoint to fine-tune "
                                                          "from; '{backbone}' is replaced by the name")
    head_lr_mult: float = Field(10.0, gt=0, description="learning-rate multiplier of the new head "
                                                        "when fine-tuning (d2l uses 10)")
    freeze: list[str] = Field([], description="parameter-name prefixes kept frozen, e.g. [conv1, bn1, layer1]")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout before the classifier")

    @model_validator(mode="after")
    def _unique_names(self) -> ModelConfig:
        """Every experiment name is a safe folder name, made by one entry only (compared ignoring case, as some
        file systems do); `only` names existing experiments."""
        seen: dict[str, str] = {}
        for i, entry in enumerate(self.backbones):
            where = _describe(entry, i)
            if isinstance(entry, ExperimentSpec):
                entry.check(f"model.backbones[{i}]")
                names = [name for name, _ in entry.expand()]
            else:
                names = [entry]
            for name in names:
                if not SAFE_NAME.match(name):
                    fix = "rename it" if isinstance(entry, ExperimentSpec) and entry.name else \
                        "give the entry a name: {name: ..., backbone: ...}"
                    raise SpecError(f"{where}: experiment name {name!r} is not a safe folder name (letters, digits, "
                                    f"'.', '_', '-'; up to 100 characters); {fix}")
                if name.lower() in seen:
                    raise SpecError(f"{where}: experiment name {name!r} is also made by {seen[name.lower()]}; "
                                    "give one of them another name")
                seen[name.lower()] = where
        unknown = [n for n in self.only or [] if n.lower() not in seen]
        if unknown:
            names = ", ".join(self.experiment_names())
            raise SpecError(f"model.only: no experiment named {unknown[0]!r}; the experiments are {names}")
        return self

    def experiment_names(self) -> list[str]:
        return [name for e in self.backbones for name in ([e] if isinstance(e, str) else [n for n, _ in e.expand()])]


class RoundSpec(Section):
    """One round after round 1 (model.backbones): its experiments, trained with pseudo-labelled test images."""

    experiments: list[Entry] = Field(min_length=1, description="as model.backbones: names or experiment specs; "
                                                               "names distinct from every other round's")
    pseudo: PseudoConfig = Field(PseudoConfig(), description="the pseudo-labels this round adds to training")

    def names(self, where: str) -> list[str]:
        """Its experiment names, after model.backbones' own checks (keys, sweeps, safe and unique names)."""
        try:
            return ModelConfig(backbones=self.experiments).experiment_names()
        except ValidationError as err:
            cause = err.errors()[0].get("ctx", {}).get("error")
            msg = str(cause) if isinstance(cause, SpecError) else err.errors()[0]["msg"]
            raise SpecError(msg.replace("model.backbones", f"{where}.experiments")) from None


class RoundsConfig(Section):
    plan: list[RoundSpec] = Field([], description="rounds 2, 3, ... in order, each {experiments, pseudo: {source, "
                                                  "threshold, target_precision, max_per_class}}; round r learns from "
                                                  "round r-1's test predictions (docs/rounds.md); []: one round")


class Config(Section):
    competition: CompetitionConfig = CompetitionConfig()
    clean: CleanConfig = CleanConfig()
    folds: FoldsConfig = FoldsConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    predict: PredictConfig = PredictConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    export: ExportConfig = ExportConfig()
    distill: DistillConfig = DistillConfig()
    tune: TuneConfig = TuneConfig()
    autogluon: AutoGluonConfig = AutoGluonConfig()
    auto: AutoConfig = AutoConfig()
    detect: DetectConfig = DetectConfig()
    segment: SegmentConfig = SegmentConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()
    rounds: RoundsConfig = RoundsConfig()

    @model_validator(mode="after")
    def _round_names(self) -> Config:
        """An experiment name belongs to one round: its folder WORK/runs/<name> holds one run."""
        seen = {n.lower(): "model.backbones" for n in self.model.experiment_names()}
        for i, spec in enumerate(self.rounds.plan):
            where = f"rounds.plan[{i}]"
            for name in spec.names(where):
                if name.lower() in seen:
                    raise SpecError(f"{where}: experiment name {name!r} is also in {seen[name.lower()]}; give it "
                                    "another name (e.g. a -r2 suffix)")
                seen[name.lower()] = where
        return self

