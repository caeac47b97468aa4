"""The config's sections: every key with its type, bounds, default and one-line description.

The experiment entries (`model.backbones`, `rounds.plan`) and the whole tree are in specs.py, the
detection track's sections in detect.py.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.fields import FieldInfo

from pipeline.core.registry import METRICS, TASKS

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # a folder name: experiments, segmentation members
VIEW_NAME = re.compile(r"^(identity|hflip|vflip|rot90|rot180|rot270|scale\d+(\.\d+)?|random\d+)$")


class SpecError(ValueError):
    """A bad entry of a list of specs (an experiment, a segmentation member); its message is already the whole
    one-line error (see loading._one_line)."""


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
    near_confirm: float = Field(0.2, ge=0, le=2, description="max distance (0..2) between the zero-mean unit-norm "
                                "16x16 luma grids of a hash pair (one image whole, the other whole or a 95% crop) "
                                "for the pair to count; planted re-encodes, resizes, 3-5% crops and 15% brightness/"
                                "contrast shifts lie within 0.14 (docs/data-quality.md)")
    near_min_size: int = Field(32, ge=1, description="images with a side below this are compared in pixel space "
                                                     "(too few pixels for perceptual hashes; see small_threshold); so "
                                                     "are images whose luma is mostly one value (sparse)")
    small_threshold: float = Field(0.09, ge=0, le=2, description="max distance (0..2) between the zero-mean unit-"
                                   "norm 16x16 luma grids of two small or sparse images (either one shifted by "
                                   "up to one pixel) for a near-duplicate pair; planted 28x28 re-encodes, gray<->RGB, "
                                   "15% brightness/contrast and 1-px shifts lie within 0.074, distinct MNIST digits "
                                   "at least 0.103 apart (docs/data-quality.md)")
    conflicts: Literal["drop", "majority"] = Field("drop", description="duplicate groups whose labels disagree: "
                                                                       "drop them all, or keep the majority label")
    drop_flat: bool = Field(False, description="drop training images of one flat colour (never the last images of a "
                            "label); default: kept and reported, since empty images are a label in many competitions")
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
                             "fold run (docs/data-quality.md)")
    embedding_threshold: float = Field(0.95, ge=-1, lt=1, description="embeddings: cosine similarity above which two "
                                       "images pair; check duplicates.csv's similarity column for your backbone")
    embedding_backbone: str | None = Field(None, description="embeddings: timm backbone whose model.pretrained_path "
                                           "weights embed ('{backbone}' filled in); null: the first experiment's")
    embedding_image_size: int | None = Field(None, ge=8, description="embeddings: image side the backbone sees; "
                                             "null: the first experiment's train.image_size (a fold run: its own)")
    label_issues: Literal["report", "drop", "relabel"] = Field(
        "report", description="rows in WORK/label_issues.csv (make labels): only report them, or have the next clean "
                              "drop them or give them the suggested label (then the CV is against cleaned labels)")
    mask_conflict_dice: float = Field(0.8, ge=0, le=1, description="segmentation folders: duplicate training images "
                                      "whose masks' Dice (the lowest over the classes) is below this are reported as "
                                      "a mask conflict (duplicates.csv, never dropped)")


class FoldsConfig(Section):
    n_splits: int = Field(5, ge=2, description="number of cross-validation folds (StratifiedGroupKFold)")
    seed: int = Field(42, description="seed of the fold shuffle; same seed, same folds")



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
    parallel_runs: int = Field(1, ge=1, description="runs (experiment folds, predictions) at once on this machine, "
                                                    "in worker processes: one GPU each, or cores // N CPU threads each "
                                                    "(make train JOBS=N)")
    cluster: str | None = Field(None, description="Ray cluster address (ray://head:10001, or head:6379 on a cluster "
                                                  "machine): the runs' workers become Ray tasks; every machine must "
                                                  "mount WORK and DATA at the same paths (make train CLUSTER=...)")
    cluster_cpus: int = Field(1, ge=1, description="CPUs each Ray task asks for, and its torch threads")
    cluster_memory_gb: float | None = Field(None, gt=0, description="memory each Ray task asks for, in GiB; "
                                                                    "null: none reserved")


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


class ExportConfig(Section):
    experiment: str | None = Field(None, description="make export: the experiment whose fold model becomes ONNX; "
                                                     "null: the first of model.backbones (on a detection folder: "
                                                     "null or this config's configuration name)")
    fold: int = Field(0, ge=0, description="make export: the fold model exported")
    opset: int = Field(17, ge=9, description="ONNX opset of make export and of the bundle's ONNX files")
    tolerance: float = Field(1e-4, gt=0, description="make export (and a detection bundle's graphs): largest abs "
                                                     "difference of logits (a detector's raw outputs) between "
                                                     "onnxruntime and torch on the test images before it refuses")
    bundle_onnx: bool = Field(False, description="make bundle: also write every fold model (a detector's network "
                                                 "part) as ONNX, for predict.py --engine onnx")
    bundle_of: Literal["ensemble", "student"] = Field(
        "ensemble", description="make bundle: the ensemble's chosen submission (submissions/<competition>-bundle), "
                                "or the distilled student alone (<competition>-student-bundle; after make distill)")
    bundle_folds: list[int] | None = Field(None, description="make bundle: only these fold models of each member "
                                                             "(e.g. [0]: one model per member, faster; its CSV then "
                                                             "differs from the submission); null: every fold")


class DistillConfig(Section):
    backbone: str | None = Field(None, description="make distill: the student's backbone; null: the chosen blend's "
                                                   "member with the fewest parameters")
    image_size: int | None = Field(None, ge=8, description="the student's input size; null: train.image_size")
    epochs: int | None = Field(None, ge=1, description="the student's (and its hard-label twin's) epochs; null: "
                                                        "twice train.epochs (a student learns an ensemble's function "
                                                        "slowly: patient distillation)")
    temperature: float = Field(1.0, gt=0, description="targets p^(1/T), renormalised (T < 1 sharpens)")
    label_weight: float = Field(0.0, ge=0, le=1, description="a training row's target: this share of its one-hot "
                                                             "label plus the rest of the teachers' probabilities "
                                                             "(Hinton's mix; test rows have no label)")
    tta: list[str] = Field(["identity"], min_length=1, description="the student's test-time views (one view: "
                                                                   "the fast single model)")
    hard_baseline: bool = Field(True, description="also train the student's backbone on the hard labels, for the "
                                                  "table's comparison")
    init: Literal["teacher", "scratch"] = Field("teacher", description="teacher: the fold-k student starts from "
                                                "the fold-k weights of a used teacher of its backbone and image size "
                                                "(trained on the same rows: leak-free), and learns the rest of the "
                                                "ensemble from there; scratch, or no such teacher: random weights")
    lr: float | None = Field(None, gt=0, description="the student's learning rate; null: train.lr")
    test_images: bool = Field(True, description="the fold-k student also learns the fold-k teachers' blended "
                                                "probabilities of the test images (unlabelled, so leak-free): "
                                                "targets the teachers never trained on")


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



DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")


def duration_seconds(text: str | float | int) -> float:
    """'90s', '25m', '2h' or a bare number of seconds, in seconds (auto.budget, make auto BUDGET=...)."""
    match = DURATION.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration: write 90s, 25m or 2h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


class AutoConfig(Section):
    budget: str = Field("30m", description="wall time of the whole `make auto` chain (clean to submission): 90s, 25m, "
                                           "2h; the plan fits members, epochs and sizes into it")
    reserve: float = Field(0.1, ge=0, lt=1, description="share of the budget kept for prediction, blending and "
                                                        "estimation error")
    max_members: int = Field(4, ge=1, description="most experiments the plan trains (architectures, sizes, seeds)")
    probe: bool = Field(True, description="before planning, train the fastest member briefly on fold 0 without "
                                          "flips, with mirror flips and with all eight flips/rotations; the best "
                                          "validation score decides which symmetries the members train with")
    candidates: list[str] | None = Field(None, description="backbones the plan may choose from, in order of "
                                                           "preference; null: the built-in ladder across families "
                                                           "(pipeline/training/planning.py)")

    @field_validator("budget")
    @classmethod
    def _duration(cls, value: str) -> str:
        duration_seconds(value)
        return value


class TrackingConfig(Section):
    backend: Literal["mlflow", "none"] = Field("mlflow", description="log every training run (params, per-epoch "
                                               "metrics, curves) to MLflow; none: off")
    uri: str | None = Field(None, description="MLflow tracking URI; null: $MLFLOW_TRACKING_URI when set, else the "
                                              "SQLite file WORK/mlflow.db (files in WORK/mlartifacts)")
    experiment: str | None = Field(None, description="MLflow experiment the runs go to; null: the competition name")


class PseudoConfig(Section):
    """How a round turns the previous round's test predictions into training rows (docs/rounds.md)."""

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

