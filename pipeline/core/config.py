"""One typed config for every stage.

The pydantic models below are the single source of truth: each key has a default and a one-line
description, unknown keys are errors (with a did-you-mean), and `configs/default.yaml` is generated
from them (`python -m pipeline config --defaults`; a test keeps it in sync). An experiment YAML holds
only its differences from the defaults; dotted command-line overrides (`train.epochs=3`) come last.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from pipeline.core.errors import PipelineError
from pipeline.core.registry import METRICS, TASKS


class _Loader(yaml.SafeLoader):
    """The safe loader, reading 1e-3 as a number as YAML 1.2 does (PyYAML's YAML 1.1 wants 1.0e-3, and the
    strict config no longer turns the text '1e-3' into a float)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))

VIEW_NAME = re.compile(r"^(identity|hflip|vflip|rot90|rot180|rot270|scale\d+(\.\d+)?|random\d+)$")


class Section(BaseModel):
    # strict: no silent coercion, so `train.epochs=true` or `train.amp=1` is an error rather than 1 or True; an int
    # still fills a float key (lr: 1), which is exact.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class CompetitionConfig(Section):
    name: str | None = Field(None, description="competition name; default: the DATA "
                                               "folder's name (names WORK and the submission)")
    train_csv: str = Field("train.csv", description="training table inside DATA")
    test_csv: str = Field("test.csv", description="test table inside DATA")
    sample_submission_csv: str = Field("sample_submission.csv", description="optional; fixes submission "
                                                                            "columns and row order")
    id_column: str | None = Field(None, description="image id/path column; null: detected (image, id, filename, ...)")
    label_column: str | None = Field(None, description="label column of train.csv; null: the one column test.csv lacks")
    group_column: str | None = Field(None, description="optional train.csv column of groups "
                                                       "that must share a fold (e.g. patient id)")
    image_dir: str = Field("", description="folder inside DATA prefixed to every id (for CSVs that hold bare ids)")
    image_suffix: str = Field("", description="extension appended to every id, e.g. "
                                              "'.jpg' (for CSVs that hold bare ids)")
    task: Literal[("auto", *TASKS)] = Field(
        "auto", description="what a label is: auto = decided from the label column (tags, a number or classes; "
                            "integer grades need task=ordinal), printed with its reason")
    label_separator: str = Field(" ", description="multi_label: what separates the tags of one label")
    metric: Literal[("auto", *METRICS)] = Field(
        "auto", description="competition metric used for best checkpoints and CV scores; auto: accuracy "
                            "(single_label), f1_samples (multi_label), rmse (regression), qwk (ordinal)")
    channels: Literal["auto", "gray", "rgb"] = Field("auto", description="network input: auto = gray when "
                                                                         "every image is grayscale, else rgb")
    extra: list[str] = Field([], description="more labelled folders (each with a train.csv of the same id and "
                                             "label columns, images inside it): training rows only, never "
                                             "validated or scored")


class CleanConfig(Section):
    drop_exact_duplicates: bool = Field(True, description="keep one image of each group of "
                                                          "pixel-identical training images")
    near_duplicates: bool = Field(True, description="also group near duplicates (re-encoded, "
                                                    "resized, cropped <= 5%, recoloured)")
    near_threshold: int = Field(14, ge=0, le=15, description="max pHash + dHash Hamming distance "
                                                             "(of 128 bits) for a near-duplicate pair")
    near_min_size: int = Field(32, ge=1, description="images with a side below this are compared in pixel space "
                                                     "(too few pixels for perceptual hashes; see small_threshold)")
    small_threshold: float = Field(0.09, ge=0, le=2, description="max distance (0..2) between the zero-mean unit-"
                                   "norm 16x16 luma grids of two images below near_min_size (either one shifted by "
                                   "up to one pixel) for a near-duplicate pair; planted 28x28 re-encodes, gray<->RGB, "
                                   "15% brightness/contrast and 1-px shifts lie within 0.074, distinct MNIST digits "
                                   "at least 0.103 apart (README)")
    conflicts: Literal["drop", "majority"] = Field("drop", description="duplicate groups whose labels disagree: "
                                                                       "drop them all, or keep the majority label")
    drop_flat: bool = Field(True, description="drop training images of one flat colour")
    transfer_test_labels: bool = Field(False, description="submit the known label for test images "
                                                          "that duplicate training images (opt-in)")
    keep_extra_leaks: bool = Field(False, description="keep competition.extra images that duplicate a test image "
                                                      "(reported as leaks either way; default: dropped)")
    max_pixels: int = Field(89_478_485, ge=1, description="images with more pixels are refused from their header, "
                                                          "before decoding (decompression bombs): a training image is "
                                                          "dropped, a test image is an error; default: Pillow's limit")
    workers: int | None = Field(None, ge=1, description="decoding processes; null: one per CPU core")
    report_groups: int = Field(200, ge=0, description="duplicate groups shown as thumbnails in report/clean.html "
                                                      "(and flagged rows in report/labels.html)")
    embeddings: bool = Field(False, description="also pair images whose backbone embeddings are similar (bigger crops, "
                             "recolours, the same object twice); needs weights: model.pretrained_path or a trained "
                             "fold run (README: Duplicates)")
    embedding_threshold: float = Field(0.95, ge=-1, lt=1, description="embeddings: cosine similarity above which two "
                                       "images pair; check duplicates.csv's similarity column for your backbone")
    embedding_backbone: str | None = Field(None, description="embeddings: timm backbone whose model.pretrained_path "
                                           "weights embed ('{backbone}' filled in); null: the first experiment's")
    embedding_image_size: int | None = Field(None, ge=8, description="embeddings: image side the backbone sees; "
                                             "null: the first experiment's train.image_size (a fold run: its own)")
    label_issues: Literal["report", "drop", "relabel"] = Field(
        "report", description="rows in WORK/label_issues.csv (make labels): only report them, or have the next clean "
                              "drop them or give them the suggested label (then the CV is against cleaned labels)")


class FoldsConfig(Section):
    n_splits: int = Field(5, ge=2, description="number of cross-validation folds (StratifiedGroupKFold)")
    seed: int = Field(42, description="seed of the fold shuffle; same seed, same folds")


SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
NOT_OVERRIDDEN = {"model": {"backbones", "only"}, "train": {"folds"}}  # run selection, not part of an experiment


class SpecError(ValueError):
    """A bad experiment entry; its message is already the whole one-line error (see _one_line)."""


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
                    raise fail(f"unknown key '{key}'{_did_you_mean(key)}") from None
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
        description="the experiments: timm model names or the course's nets (d2l_lenet, d2l_alexnet, d2l_vgg11, "
                    "d2l_nin, d2l_googlenet, d2l_resnet18), or entries {name, backbone, seeds, image_sizes, train, "
                    "model, predict} (README: Experiments)")
    only: list[str] | None = Field(None, min_length=1,
                                   description="experiment names that train and predict run (make EXP=a,b); null: all")
    pretrained: bool = Field(False, description="load ImageNet weights from the hub (needs "
                                                "internet; offline use pretrained_path)")
    pretrained_path: str | None = Field(None, description="local safetensors or timm checkpoint to fine-tune "
                                                          "from; '{backbone}' is replaced by the name")
    head_lr_mult: float = Field(10.0, gt=0, description="learning-rate multiplier of the new head "
                                                        "when fine-tuning (the course uses 10)")
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


class FitConfig(Section):
    """The training keys both tracks share (types and bounds here); each track's section gives them its own
    defaults and descriptions with `_own`, so the two cannot drift apart in meaning."""

    epochs: int = Field(10, ge=1, description="training epochs")
    batch_size: int = Field(64, ge=1, description="images per forward pass")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.05, ge=0, description="weight decay")
    hflip: bool = Field(True, description="random horizontal flips")
    seed: int = Field(42, description="seed of weights init, batch order and augmentation")


def _own(name: str, default: Any, description: str) -> Any:
    """FitConfig's field `name` with this track's default and description (same type and bounds)."""
    return FieldInfo.merge_field_infos(FitConfig.model_fields[name], default=default, description=description)


class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when present, else cpu "
                                                   "(both tracks, training and prediction)")
    amp: bool = Field(True, description="autocast (mixed precision) on cuda in training and prediction; ignored on cpu")
    amp_dtype: Literal["bfloat16", "float16"] = Field("bfloat16",
                                                      description="autocast dtype on cuda (float16 uses a grad scaler)")
    channels_last: bool | None = Field(None, description="channels-last memory format; null: on cuda for "
                                                         "classification, always for detection")
    compile: bool = Field(False, description="torch.compile the classification network for training")
    num_workers: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        "auto", description="DataLoader worker processes of classification training (0: load in the main process); "
                            "auto: on cuda the cores per GPU less one (at most 8), on cpu 0")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; null: torch's default")
    eval_batch_factor: int = Field(2, ge=1, description="validation batches hold batch_size x this many images "
                                                        "(no gradients: more fit in memory)")


class TrainConfig(FitConfig):
    image_size: int = Field(224, ge=8, description="images are decoded once and resized to image_size x image_size")
    epochs: int = _own("epochs", 10, "training epochs per fold")
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        64, description="images per forward pass; auto: the largest that fits in GPU memory, halving from 1024 "
                        "(cpu: 64)")
    accumulate: int = Field(1, ge=1, description="forward passes per optimizer step (gradient accumulation)")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="optimizer")
    lr: float = _own("lr", 1e-3, "peak learning rate (of the body, when head_lr_mult applies)")
    momentum: float = _own("momentum", 0.9, "sgd momentum")
    nesterov: bool = Field(True, description="sgd with Nesterov momentum")
    weight_decay: float = _own("weight_decay", 0.05, "weight decay (not applied to norms and biases)")
    schedule: Literal["cosine", "plateau"] = Field("cosine", description="cosine with warmup (per update), or "
                                                                         "lower on plateau of the val metric")
    warmup_epochs: float = Field(1.0, ge=0, description="linear warmup, in epochs")
    min_lr: float = Field(1e-6, ge=0, description="learning rate at the end of the cosine schedule")
    plateau_factor: float = Field(0.1, gt=0, lt=1, description="plateau: lr multiplier when the metric stalls")
    plateau_patience: int = Field(2, ge=0, description="plateau: epochs without improvement before lowering the lr")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this value; null: no clipping")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the targets")
    loss: Literal["mse", "huber", "bce_scaled"] = Field(
        "mse", description="regression and ordinal loss: mse or huber on the standardised target, or bce_scaled "
                           "(BCE on the target min-max scaled to [0, 1], sigmoid head)")
    class_weights: Literal["none", "balanced"] | list[float] = Field(
        "none", description="loss weight per class: none, balanced (inverse frequency) or a list")
    early_stopping: int | None = Field(None, ge=1, description="stop after this many epochs without "
                                                               "a better val metric; null: never")
    augment: Literal["none", "light", "medium", "heavy"] = Field(
        "light", description="augmentation preset (flips, shifts/rotations, bigger random crops, colour)")
    transforms: list[dict] = Field([], description="extra albumentations transforms, e.g. [{CoarseDropout: {p: 0.3}}]")
    augment_device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="where the preset runs: cpu (albumentations per image in the loader workers), gpu "
                            "(batched on the training device, no host waits); auto: gpu on cuda when the measured "
                            "cpu path is slower than the GPU trains")
    hflip: bool = _own("hflip", True,
                       "random horizontal flips in the presets; off when mirror images mean something else")
    normalize: Literal["auto", "dataset", "imagenet"] = Field("auto", description="input statistics: auto = imagenet "
                                                                                  "when fine-tuning, else the data's")
    mixup_alpha: float = Field(0.0, ge=0, description="Mixup alpha (0: off)")
    cutmix_alpha: float = Field(0.0, ge=0, description="CutMix alpha (0: off)")
    mix_prob: float = Field(1.0, ge=0, le=1, description="probability that a batch is mixed")
    mix_switch_prob: float = Field(0.5, ge=0, le=1, description="probability of CutMix instead "
                                                                "of Mixup when both are on")
    mix_off_epoch: int = Field(0, ge=0, description="no mixing from this epoch on (0: mix until the end)")
    ema: bool = Field(False, description="keep an EMA of the weights (timm "
                                         "ModelEmaV3); it is evaluated and checkpointed")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA decay per update")
    folds: list[int] | None = Field(None, description="folds to train; null: all (other folds get no OOF rows)")
    seed: int = _own("seed", 42, "seed of weights init, batch order and augmentation")


class PredictConfig(Section):
    tta: list[str] = Field(["identity", "hflip"], min_length=1, description="test-time views: identity hflip vflip "
                                                                            "rot90 rot180 rot270 scale<f> random<k>")
    tta_policy: Literal["all", "auto"] = Field("auto", description="all: merge every view; auto: keep "
                                                                   "the views that improve the OOF score")
    tta_merge: Literal["mean", "geometric"] = Field(
        "mean", description="merge views by mean of probabilities or their geometric mean (= mean of logits)")
    tta_seed: int = Field(0, description="seed of the random<k> views")
    tta_random_degrees: float = Field(10.0, ge=0, le=180,
                                      description="random<k> views: rotation drawn from ± this many degrees")
    tta_random_scale: float = Field(0.1, ge=0, lt=1, description="random<k> views: zoom drawn from 1 ± this")
    tta_random_shift: float = Field(0.06, ge=0, le=0.5,
                                    description="random<k> views: shift drawn from ± this fraction of the side")
    batch_size: int = Field(256, ge=1, description="images per forward pass (each carries every TTA view)")


    @field_validator("tta")
    @classmethod
    def _known_views(cls, views: list[str]) -> list[str]:
        bad = [v for v in views if not VIEW_NAME.match(v)]
        if bad:
            raise ValueError(f"unknown TTA view {bad[0]!r}; use identity, hflip, vflip, rot90, rot180, rot270, "
                             "scale<f>, random<k>")
        if len(set(views)) != len(views):
            raise ValueError("a TTA view is listed twice")
        return views


class EnsembleConfig(Section):
    method: str = Field("auto", description="auto: the best honest score; or a blend (mean, geometric, rank, "
                                            "weights, caruana, stack) or model name")
    objective: Literal["log_loss", "metric"] = Field("log_loss", description="what fitted blends (weights, "
                                                                             "caruana) optimise on OOF")
    caruana_rounds: int = Field(25, ge=1, description="greedy selection steps of the Caruana blend")
    stack_c: float = Field(1.0, gt=0, description="inverse L2 strength of the stack (logistic regression on "
                                                   "every model's OOF log-probabilities): smaller, more regularised")
    stack_lightgbm: bool = Field(False, description="also a LightGBM stack on every model's OOF probabilities, "
                                 "nested like the others (its own row, lightgbm_stack; only when lightgbm imports)")
    include_other: bool = Field(True, description="also blend other oof.parquet/test.parquet pairs found under WORK")
    thresholds: Literal["per_class", "global", "fixed"] = Field(
        "per_class", description="thresholded metrics (multi-label F-scores, ordinal qwk): cut points tuned on OOF, "
                                 "nested (per_class: one per tag; global: one for all tags; both: ordinal cut "
                                 "points), or fixed (0.5; halfway between grades)")
    output: Literal["auto", "labels", "probabilities"] = Field("auto", description="submission values; auto: "
                                                                                   "as sample_submission shows")


class TuneConfig(Section):
    space: str = Field("configs/tune/default.yaml", description="YAML search space: dotted config keys "
                                                                "with int/float/log/categorical ranges")
    n_trials: int = Field(20, ge=1, description="completed + pruned trials in the study, all "
                                                "processes together (a rerun continues up to this)")
    timeout: float | None = Field(None, gt=0, description="stop starting trials after this "
                                                          "many seconds; null: no limit")
    folds: list[int] = Field([0], min_length=1, description="folds each trial trains and is scored on")
    epochs: int = Field(3, ge=1, description="training epochs per trial (the score reported to the pruner each epoch)")
    pruner: Literal["median", "hyperband", "successive_halving", "none"] = Field("median", description="Optuna pruner")
    seed: int = Field(42, description="seed of the TPE sampler: same seed and budget, same trial parameters")
    storage: str | None = Field(None, description="Optuna storage URL; null: sqlite in WORK/optuna.db (resumable)")


class AutoGluonConfig(Section):
    python: str = Field(".venv-autogluon/bin/python", description="interpreter of AutoGluon's own "
                                                                  "environment (make autogluon creates it)")
    backbone: str = Field("resnet18", description="timm image backbone of the MultiModalPredictor")
    pretrained: bool = Field(False, description="true: hub weights by name (online); false: "
                                                "a local export of the timm model (offline)")
    presets: str | None = Field(None, description="AutoGluon presets, e.g. medium_quality; null: AutoGluon's default")
    epochs: int = Field(5, ge=1, description="optim.max_epochs per fold")
    lr: float = Field(1e-3, gt=0, description="optim.lr (AutoGluon's own default, 1e-4, suits pretrained weights only)")
    image_size: int = Field(64, ge=16, description="image side AutoGluon trains at")
    batch_size: int = Field(32, ge=1, description="env.per_gpu_batch_size")
    time_limit: int = Field(600, ge=10, description="seconds per fold")
    folds: list[int] | None = Field(None, description="folds to fit; null: all (OOF rows only for these)")


class DetectConfig(FitConfig):
    train_csv: str = Field("train.csv", description="one row per box: image, label, xmin, ymin, xmax, "
                                                    "ymax (pixels); empty label and box: no objects")
    val_csv: str | None = Field("val.csv", description="validation boxes in the same form; when DATA "
                                                       "lacks it, val_fraction of the training images")
    test_csv: str = Field("test.csv", description="images to detect objects in (column image)")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of training images held "
                                                             "out when there is no val_csv")
    image_size: int = Field(256, ge=64, description="images are decoded once and resized to "
                                                    "image_size x image_size (the course: 256)")
    model: Literal["tinyssd", "retinanet", "fcos", "ssdlite"] = Field(
        "tinyssd", description="tinyssd: the course's; retinanet, fcos: torchvision's on a timm backbone with an FPN; "
                               "ssdlite: torchvision's SSDlite on MobileNetV3 (README: choosing a detector)")
    backbone: str = Field("resnet18", description="retinanet, fcos: timm CNN under the FPN (random init; "
                                                  "pretrained_path for weights)")
    fpn_channels: int = Field(128, ge=32, multiple_of=32,
                              description="retinanet, fcos: channels of the FPN levels and the heads "
                                          "(GroupNorm: a multiple of 32; torchvision: 256)")
    pretrained_path: str | None = Field(None, description="local state dict (.safetensors, .pt, .pth) of the whole "
                                                          "detector or of its backbone; null: random init")
    epochs: int = _own("epochs", 20, "training epochs")
    batch_size: int = _own("batch_size", 16, "images per update (the course: 32; 16 learns faster here, see README)")
    lr: float = _own("lr", 0.01, "SGD learning rate (0.01 suits loss ssd; loss course learns best at 0.05; "
                                 "the course: 0.2 without momentum)")
    momentum: float = _own("momentum", 0.9, "SGD momentum (the course: none; 0.9 learns faster, see README)")
    weight_decay: float = _own("weight_decay", 5e-4, "SGD weight decay (the course: 5e-4)")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="learning rate over the epochs: constant "
                                                                          "(the course) or cosine down to lr/100")
    loss: Literal["course", "ssd"] = Field("ssd", description="ssd (the SSD paper's): CE over positives + 3x as many "
                                                              "hard negatives and masked L1, per positive anchor; "
                                                              "course: mean CE over all anchors + mean masked L1")
    negative_ratio: float = Field(3.0, gt=0, description="ssd loss: highest-loss background anchors "
                                                         "kept per positive anchor (the SSD paper: 3)")
    hflip: bool = _own("hflip", True, "random horizontal flips of images and their boxes")
    vflip: bool = Field(False, description="random vertical flips of images and their boxes")
    crop_scale: float | None = Field(None, gt=0, le=1, description="random resized crop (albumentations, half the "
                                                                   "images) keeping at least this share of the area; "
                                                                   "null: off")
    scale: float = Field(0.0, ge=0, lt=1, description="random zoom in [1 - scale, 1 + scale] (half the images)")
    shift: float = Field(0.0, ge=0, lt=1, description="random shift up to this share of the side (half the images)")
    colour: float = Field(0.0, ge=0, le=1, description="colour jitter strength: brightness, contrast, saturation "
                                                       "(hue a quarter of it)")
    mosaic: float = Field(0.0, ge=0, le=1, description="probability that a training image becomes a 2x2 mosaic "
                                                       "with three other training images")
    min_visibility: float = Field(0.3, ge=0, le=1, description="after a crop or mosaic, boxes with less than this "
                                                               "share of their area visible are dropped")
    anchors: Literal["fixed", "auto"] = Field("fixed", description="fixed: anchor_sizes and anchor_ratios; auto: "
                                                                   "k-means of the training boxes' sizes and aspect "
                                                                   "ratios (as many as anchor_sizes/anchor_ratios)")
    anchor_sizes: list[list[float]] = Field([[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]],
                                            description="TinySSD anchor sizes (share of the side), per scale (5 "
                                                        "scales, fine to coarse, the same count each; the course's)")
    anchor_ratios: list[float] = Field([1.0, 2.0, 0.5], description="anchor aspect ratios w/h; the first meets every "
                                                                    "size, the others the first size (the course's)")
    seed: int = _own("seed", 0, "seed of weights init, batch order, flips and the validation split")
    folds: int = Field(5, ge=1, description="train one model per fold of the training images (duplicate groups of "
                                            "WORK/clean.csv kept together), OOF detections and a WBF ensemble; 1: "
                                            "one model on all of train.csv, validated on val.csv or val_fraction")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                             description="folds > 1: this detector configuration's folder WORK/detect/<name> and its "
                                         "leaderboard rows; every configuration run into the same WORK joins the WBF "
                                         "blend of models (null: the model, or model-backbone)")
    tta_scales: list[float] = Field([1.0], description="folds > 1: input scales of the test-time views fused by WBF")
    fusion_hflip: bool = Field(True, description="folds > 1: each scale also runs mirrored, as another WBF view")
    fusion_iou: list[float] = Field([0.4, 0.5, 0.6, 0.7], description="WBF IoU thresholds tried on OOF (the best "
                                                                       "is used for test)")
    fusion_skip: list[float] = Field([0.01, 0.03, 0.1], description="WBF skip_box_thr values tried on OOF: boxes "
                                                                     "scored lower do not enter the fusion")
    fusion_conf: list[Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]] = Field(
        ["avg", "max"], min_length=1,
        description="WBF fused-box scores tried on OOF (ensemble-boxes' conf_type): avg scales the mean score by "
                    "the share of lists that found the box, max keeps the best score")
    nms_threshold: float = Field(0.5, gt=0, le=1, description="IoU above which NMS drops the "
                                                              "lower-scored box of the same class")
    box_voting: float | None = Field(0.5, gt=0, le=1, description="each box NMS keeps becomes the score-weighted mean "
                                                                  "of the same-class boxes overlapping it at IoU >= "
                                                                  "this (tighter boxes); null: NMS boxes as they are")
    tta: Literal["auto", "none", "hflip"] = Field(
        "auto", description="test-time augmentation: hflip averages each anchor's predictions with "
                            "its mirror image's; auto: hflip when it scores a higher validation mAP@0.5")
    score_threshold: float = Field(0.05, ge=0, lt=1, description="submission keeps boxes scored at least "
                                                                 "this (mAP metrics reward a low threshold)")
    gallery_score_threshold: float = Field(0.5, ge=0, lt=1, description="the galleries draw boxes scored at least this")
    map_score_threshold: float = Field(0.01, ge=0, lt=1, description="boxes scored at least this enter mAP (low, "
                                                                     "so the precision-recall curve is complete)")
    max_detections: int = Field(100, ge=1, description="boxes kept per image, best first")
    gallery_images: int = Field(16, ge=0, description="images drawn in each of gallery_val.png and gallery_test.png")


class TrackingConfig(Section):
    backend: Literal["mlflow", "none"] = Field("mlflow", description="log every training run (params, per-epoch "
                                               "metrics, curves) to MLflow; none: off")
    uri: str | None = Field(None, description="MLflow tracking URI; null: $MLFLOW_TRACKING_URI when set, else the "
                                              "SQLite file WORK/mlflow.db (files in WORK/mlartifacts)")
    experiment: str | None = Field(None, description="MLflow experiment the runs go to; null: the competition name")


class PseudoConfig(Section):
    """How a round turns the previous round's test predictions into training rows (README: Rounds)."""

    source: Literal["fold", "all"] = Field(
        "fold", description="fold: the fold-k model learns from the blend of the previous round's fold-k models "
                            "only (leak-free); all: from the all-fold ensemble (test.parquet; leaks, for comparison)")
    threshold: Literal["auto"] | Annotated[float, Field(ge=0, le=1)] = Field(
        "auto", description="a test image becomes a row when its top blended probability is at least this; auto: "
                            "per fold, the lowest one whose OOF accuracy (other folds' rows) reaches target_precision")
    target_precision: float = Field(0.99, gt=0, le=1, description="threshold=auto: the OOF accuracy required "
                                                                  "among the rows above the threshold")
    max_per_class: int | None = Field(None, ge=1, description="keep at most this many pseudo rows per class and "
                                                               "fold, the most confident first; null: no cap")
    labels: Literal["hard", "soft"] = Field("hard", description="hard: a row's target is the blend's top class; soft: "
                                            "its probability vector (soft cross-entropy)")
    temperature: float = Field(1.0, gt=0, le=1, description="labels=soft: targets p^(1/T) renormalised; below 1 "
                                                            "sharpens them, 1 keeps the blend's probabilities")


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
                                                  "round r-1's test predictions (README: Rounds); []: one round")


class Config(Section):
    competition: CompetitionConfig = CompetitionConfig()
    clean: CleanConfig = CleanConfig()
    folds: FoldsConfig = FoldsConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    predict: PredictConfig = PredictConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    tune: TuneConfig = TuneConfig()
    autogluon: AutoGluonConfig = AutoGluonConfig()
    detect: DetectConfig = DetectConfig()
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


def known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += known_keys(ann, prefix + name + ".")
    return keys


MOVED = {f"{track}.{key}": f"runtime.{key}" for track in ("train", "detect")
         for key in ("device", "amp", "amp_dtype", "channels_last", "compile", "num_workers", "threads")}


def _did_you_mean(key: str) -> str:
    if key in MOVED:
        return f" (it moved to '{MOVED[key]}', shared by both tracks)"
    close = difflib.get_close_matches(key, known_keys(Config), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _one_line(err: ValidationError, source: str) -> PipelineError:
    first = err.errors()[0]
    if isinstance(first.get("ctx", {}).get("error"), SpecError):
        return PipelineError(f"{source}: {first['ctx']['error']}")
    loc = list(first["loc"])
    if loc[:2] == ["model", "backbones"] and len(loc) > 3 and loc[3] in ("spec", "name"):  # inside an entry
        entry = f"model.backbones[{loc[2]}]"
        if first["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[4]), list(ExperimentSpec.model_fields), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            return PipelineError(f"{source}: {entry}: unknown experiment key '{loc[4]}'{hint}")
        where = ".".join(str(p) for p in loc[4:])
        if first["type"] == "missing":
            return PipelineError(f"{source}: {entry}: the experiment key '{where}' is missing")
        return PipelineError(f"{source}: {entry}{' ' + where if where else ''}: {first['msg']} "
                             f"(got {first.get('input')!r})")
    literals = _union_literals(err.errors())
    if literals is not None:  # `auto` or a number: the number's complaint, then the words it also takes
        first = next(e for e in err.errors() if not str(e["loc"][-1]).startswith("literal["))
        key = ".".join(str(p) for p in first["loc"][:-1])
        return PipelineError(f"{source}: config key '{key}': {first['msg']} (got {first.get('input')!r}), "
                             f"or {literals}")
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return PipelineError(f"{source}: unknown config key '{key}'{_did_you_mean(key)}")
    return PipelineError(f"{source}: config key '{key}': {first['msg']} (got {first.get('input')!r})")


def _union_literals(errors: list[dict]) -> str | None:
    """The words a `Literal[...] | int` key takes ("'auto'"), when every error is one branch of that key's union
    (pydantic names each branch in the last place of the location); None otherwise."""
    if len(errors) < 2 or len({tuple(e["loc"][:-1]) for e in errors}) != 1:
        return None
    literal = [e for e in errors if str(e["loc"][-1]).startswith("literal[")]
    if not literal or len(literal) == len(errors):
        return None
    return " or ".join(str(e["loc"][-1])[len("literal["):-1] for e in literal)


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PipelineError(f"{source}: '{dotted}' goes inside a value that is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ["train.epochs=3", "model.backbones=[a,b]"] into a nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PipelineError(f"override '{item}': expected KEY=VALUE, e.g. train.epochs=3")
        if key not in known_keys(Config):
            raise PipelineError(f"override '{item}': unknown config key '{key}'{_did_you_mean(key)}")
        try:
            value = yaml.load(raw, Loader=_Loader) if raw != "" else None
        except yaml.YAMLError:
            raise PipelineError(f"override '{item}': value is not valid YAML") from None
        _set_dotted(tree, key, value, f"override '{item}'")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _not_text(path: Path, exc: yaml.reader.ReaderError) -> PipelineError:
    """PyYAML reads UTF-8 and, with a byte-order mark, UTF-16; anything else names its line and the fix."""
    line = path.read_bytes()[:exc.position].count(b"\n") + 1
    what = f"byte 0x{exc.character:02x}" if isinstance(exc.character, int) else f"character {exc.character!r}"
    return PipelineError(f"{path} line {line}: not UTF-8 text ({what}); save the file as UTF-8")


def read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise PipelineError(f"config file {path} is a folder; pass a YAML file, e.g. CONFIG=configs/<name>.yaml")
    if not path.is_file():
        raise PipelineError(f"config file {path} not found; pass an existing CONFIG=configs/<name>.yaml")
    try:
        tree = yaml.load(path.read_bytes(), Loader=_Loader) or {}  # a SafeLoader; bytes: encoding from the BOM
    except yaml.reader.ReaderError as exc:
        raise _not_text(path, exc) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PipelineError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(tree, dict):
        raise PipelineError(f"{path}: expected a mapping of config sections at the top level")
    return tree


def load_config(path: Path | None = None, overrides: list[str] | None = None, tuned: Path | None = None) -> Config:
    """Defaults, then the experiment YAML, then tuned parameters (if given), then dotted overrides."""
    tree: dict = read_yaml(Path(path)) if path else {}
    source = str(path) if path else "config"
    try:
        Config.model_validate(tree)
    except ValidationError as err:
        raise _one_line(err, source) from None
    if tuned is not None:
        extra = read_yaml(Path(tuned))
        try:
            Config.model_validate(extra)
        except ValidationError as err:
            raise _one_line(err, str(tuned)) from None
        tree = _merge(tree, extra)
    tree = _merge(tree, parse_overrides(overrides or []))
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise _one_line(err, "overrides") from None


def config_hash(*sections: BaseModel) -> str:
    """Short stable hash of config sections: artifacts record it and later stages compare it."""
    blob = json.dumps([s.model_dump(mode="json") for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def defaults_yaml() -> str:
    """configs/default.yaml: every key with its default and its one-line explanation."""
    lines = ["# Every config key with its default. Generated by `python -m pipeline config --defaults`;",
             "# experiment configs hold only their differences from these values.", ""]
    for section_name, section_field in Config.model_fields.items():
        section = section_field.annotation
        lines.append(f"{section_name}:")
        for name, field in section.model_fields.items():
            value = yaml.safe_dump(field.default, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"  {name}: {value}  # {field.description}")
        lines.append("")
    return "\n".join(lines)
