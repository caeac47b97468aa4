"""TinySSD training as in d2l: cross-entropy over anchor classes + L1 over masked offsets.

Per epoch it reports d2l's training metrics (class error over all anchors, bbox MAE over
all offset entries, masked ones counted as zero error) and the same two plus mAP@0.5 and COCO
mAP@[.5:.95] on the validation images. DetectionTrainer is the detection track of the shared
training loop (pipeline/training/loop.py), which owns reseeding, resume from `last.*`, history and printing,
as it does for classification; this module plugs in the epoch over the in-memory images (seeded
batch order and flips) and the evaluation. torchvision's detectors (detect.model.name retinanet, fcos,
ssdlite: torchvision_models.py) run through the same epoch and evaluation; they compute their own
losses, and d2l's class error and bbox MAE, defined on TinySSD's anchors, are not reported
for them.

Two guards against a detector that never learns a box: a linear learning-rate warmup (train.warmup_epochs), and
`dead_reason`, which DetectionTrainer checks after epoch `dead_after` and raises DeadDetector on, so that the caller
can restart the run from scratch with another seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from pipeline.core.config import DecodeConfig, DetectTrainConfig, EvaluateConfig
from pipeline.detection.boxes import mirror_boxes, multibox_target
from pipeline.detection.infer import Detector, mean_average_precision
from pipeline.detection.tinyssd import outputs
from pipeline.detection.torchvision_models import TorchvisionDetector
from pipeline.training import loop
from pipeline.training.runtime import Runtime

WARMUP_FACTOR = 1e-3  # the warmup's first lr as a share of lr (torchvision's detection references)
# FCOS's mean GIoU box loss this close to 1, with a validation mAP@0.5 of 0: a dead detector. Not any loss near 1:
# a freshly initialised FCOS's tiny boxes score 0.999-1.001 too, for its first updates
GIOU_DEAD = 1e-4


def dead_reason(row: dict, kind: str) -> str | None:
    """Why an epoch's history row shows a detector that will never learn a box, or None.

    FCOS's regression head ends in a ReLU: once its output is negative at every location, no gradient reaches it,
    every box is a point at its location, and the GIoU loss of such a point inside its true box is exactly 1 (IoU 0,
    the enclosing box the true box). The other detectors' box outputs are linear and recover; for them a mAP of 0
    alone is an ordinary slow start, not a dead end."""
    giou = row.get("train_bbox_regression")
    if kind != "fcos" or row.get("map_50", 1.0) > 0 or giou is None or abs(giou - 1) > GIOU_DEAD:
        return None
    return f"validation mAP@0.5 0 and GIoU box loss {giou:.5f} (1: every box a point): its box regression ReLU is dead"


class DeadDetector(Exception):
    """The detector is dead (dead_reason) after `epoch`; `row` is that epoch's training and validation columns."""

    def __init__(self, reason: str, epoch: int, row: dict):
        super().__init__(reason)
        self.reason, self.epoch, self.row = reason, epoch, row


def hflip(images: torch.Tensor, labels: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror the images where `flip` (B,) is true, with their boxes (x1, x2 -> 1 - x2, 1 - x1)."""
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    mirrored = torch.cat((labels[..., :1], mirror_boxes(labels[..., 1:])), -1)
    keep = ~flip[:, None, None] | (labels[..., :1] < 0)  # padding rows stay as they are
    return images, torch.where(keep, labels, mirrored)


def ssd_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks,
             negative_ratio: float | None = None) -> torch.Tensor:
    """negative_ratio None: d2l's calc_loss (per image, mean CE over all anchors + mean L1 over all
    offset entries, masked ones zero; batch mean). A ratio r: the SSD paper's loss -- CE over the positive
    anchors and the r x as many highest-loss negatives, plus L1 over positive offsets, both divided by
    the number of positives; without it the ~99.5% background anchors drown the few positive ones."""
    b, _, c = cls_preds.shape
    ce = F.cross_entropy(cls_preds.reshape(-1, c), cls_labels.reshape(-1), reduction="none").reshape(b, -1)
    l1 = F.l1_loss(bbox_preds * bbox_masks, bbox_labels * bbox_masks, reduction="none")
    if negative_ratio is None:
        return (ce.mean(1) + l1.mean(1)).mean()
    positive = cls_labels > 0
    n_pos = positive.sum(1, keepdim=True)
    rank = ce.detach().masked_fill(positive, -1.0).argsort(1, descending=True).argsort(1)  # 0 = hardest negative
    chosen = positive | (rank < (negative_ratio * n_pos).clamp(min=1))
    return ((ce * chosen).sum() + l1.sum()) / n_pos.sum().clamp(min=1)


def error_counts(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks) -> torch.Tensor:
    """[wrong anchor classes, anchors, summed masked |offset error|, offset entries], d2l's
    cls_eval/bbox_eval."""
    wrong = (cls_preds.argmax(-1) != cls_labels).sum().double()
    l1 = ((bbox_labels - bbox_preds) * bbox_masks).abs().sum().double()
    return torch.stack([wrong, wrong.new_tensor(cls_labels.numel()), l1, l1.new_tensor(bbox_labels.numel())])


def forward(model, images: torch.Tensor, labels: torch.Tensor, runtime: Runtime):
    """Network outputs in float32 and d2l's training targets for them."""
    anchors, cls_preds, bbox_preds = outputs(model, images, runtime)
    return anchors, cls_preds, bbox_preds, multibox_target(anchors, labels.to(runtime.device))


@torch.no_grad()
def evaluate(model, decode: DecodeConfig, runtime: Runtime, images: torch.Tensor, labels: torch.Tensor,
             sizes: torch.Tensor, batch_size: int, map_score_threshold: float,
             ttas: tuple[str, ...] = ("none",)) -> dict[str, dict]:
    """Per TTA option: class error and bbox MAE (d2l's definitions, on the plain images; TinySSD only: they
    are defined on its anchors), mAP@0.5 and COCO mAP (of the boxes scored at least map_score_threshold) with these
    decoding settings. The plain forward pass is shared by all options."""
    model.eval()
    tinyssd = not isinstance(model, TorchvisionDetector)
    detectors = {t: Detector(model, decode, runtime, t) for t in ttas}
    counts, detections = torch.zeros(4, dtype=torch.float64), {t: [] for t in ttas}
    for idx in torch.arange(len(images)).split(batch_size * runtime.eval_batch_factor):
        if tinyssd:
            anchors, cls_preds, bbox_preds, targets = forward(model, images[idx], labels[idx], runtime)
            bbox_labels, bbox_masks, cls_labels = targets
            counts += error_counts(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks).cpu()
            first = (anchors, cls_preds, bbox_preds)
        else:
            first = model.candidates(images[idx], runtime)
        for t, detector in detectors.items():
            detections[t] += detector.select(*detector.run(images[idx], first=first),
                                             sizes[idx], map_score_threshold)
    course = {"val_class_err": float(counts[0] / counts[1]), "val_bbox_mae": float(counts[2] / counts[3])}
    return {t: (course if tinyssd else {}) | mean_average_precision(detections[t], labels, sizes) for t in ttas}


@dataclass
class DetectionTrainer:
    """TinySSD's or a torchvision detector's training on in-memory images; `fit()` runs the shared loop and
    returns the history. TinySSD's loss is computed here; a torchvision detector computes its own
    (torchvision_models.TorchvisionDetector.losses), and its history has one column per loss term."""

    model: torch.nn.Module
    cfg: DetectTrainConfig
    train_x: torch.Tensor  # (N, 3, S, S) uint8
    train_y: torch.Tensor  # (N, G, 5)
    val_x: torch.Tensor
    val_y: torch.Tensor
    val_sizes: torch.Tensor  # (N, 2) width, height in pixels, for mAP in image coordinates
    run_dir: Path
    fingerprint: str
    runtime: Runtime
    augment: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None  # batch index -> images, targets
    decode: DecodeConfig = field(default_factory=DecodeConfig)  # the per-epoch validation's decoding
    evaluation: EvaluateConfig = field(default_factory=EvaluateConfig)  # and its mAP's score threshold
    dead_after: int | None = None  # raise DeadDetector when dead_reason holds after this epoch (or the last)

    def __post_init__(self) -> None:
        cfg = self.cfg
        optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        self.steps = (len(self.train_x) + cfg.batch_size - 1) // cfg.batch_size
        lr_min = cfg.lr / 100 if cfg.schedule == "cosine" else cfg.lr
        total = cfg.epochs * self.steps
        # at most half the run: a 1-epoch run still trains half its updates at the full lr
        self.warmup_steps = min(round(cfg.warmup_epochs * self.steps), total // 2)
        # warmup as a prefix: the lr reaches cfg.lr when it ends, and the cosine spans the updates after it
        scheduler = CosineLRScheduler(optimizer, t_initial=total - self.warmup_steps, lr_min=lr_min,
                                      warmup_t=self.warmup_steps, warmup_lr_init=cfg.lr * WARMUP_FACTOR,
                                      warmup_prefix=True, t_in_epochs=False)
        self.updater = loop.Updater(self.model, optimizer, scheduler, grad_scaler=self.runtime.grad_scaler)
        self.negative_ratio = cfg.negative_ratio if cfg.loss == "ssd" else None
        self.torchvision = isinstance(self.model, TorchvisionDetector)
        self.kind = self.model.kind if self.torchvision else "tinyssd"
        self.row: dict[str, float] = {}  # the current epoch's training and validation columns (dead_reason)
        self.loss_terms: list[str] = []  # a torchvision detector's, named by the detector
        self.progress = loop.Progress()
        self.generator = torch.Generator()

    @property
    def history(self) -> list[dict]:
        return self.progress.history

    @property
    def epoch(self) -> int:
        return self.progress.epoch

    def reseed(self, epoch: int, epoch_seed: int) -> None:
        self.generator.manual_seed(epoch_seed)
        if self.augment is not None:
            self.augment.reseed(epoch_seed)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        order = torch.randperm(len(self.train_x), generator=self.generator)
        step = self._torchvision_step if self.torchvision else self._tinyssd_step
        total, counts, seen, t0 = 0.0, 0.0, 0, time.perf_counter()
        batches = order.split(self.cfg.batch_size)
        bar = tqdm(batches, desc=f"detect: epoch {epoch}/{self.cfg.epochs}", unit="batch", leave=False, disable=None)
        self.updater.start_epoch()
        for i, idx in enumerate(bar, 1):
            if self.augment is not None:  # box-aware augmentation (augment.py) does its own flips
                images, labels = self.augment(idx)
            else:
                images, labels = self.train_x[idx], self.train_y[idx]
                if self.cfg.hflip:
                    images, labels = hflip(images, labels, torch.rand(len(idx), generator=self.generator) < 0.5)
            loss, batch_counts = step(images, labels)
            self.updater.backward(loss, i, len(batches))
            total, seen = total + loss.detach() * len(idx), seen + len(idx)  # device tensors: no host sync per batch
            counts = counts + batch_counts * (len(idx) if self.torchvision else 1)
            if not bar.disable and bar.n % 10 == 0:
                bar.set_postfix(loss=f"{total.item() / seen:.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        counts = counts.cpu()
        if self.torchvision:  # the mean of each loss term over the epoch's images
            self.row = {"train_loss": float(total) / seen} | {f"train_{k}": float(v) / seen
                                                             for k, v in zip(self.loss_terms, counts, strict=True)}
        else:
            self.row = {"train_loss": float(total) / seen, "train_class_err": float(counts[0] / counts[1]),
                        "train_bbox_mae": float(counts[2] / counts[3])}
        return self.row

    def _tinyssd_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss and d2l's error counts (error_counts)."""
        _, cls_preds, bbox_preds, targets = forward(self.model, images, labels, self.runtime)
        bbox_labels, bbox_masks, cls_labels = targets
        loss = ssd_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks, self.negative_ratio)
        return loss, error_counts(cls_preds.detach(), cls_labels, bbox_preds.detach(), bbox_labels, bbox_masks)

    def _torchvision_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum of the detector's own loss terms (torchvision's weighting) and the terms themselves."""
        losses = self.model.losses(images, labels, self.runtime)
        self.loss_terms = sorted(losses)
        terms = torch.stack([losses[k].detach() for k in self.loss_terms])
        return sum(losses[k] for k in self.loss_terms), terms

    def validate(self) -> dict[str, float]:
        scores = evaluate(self.model, self.decode, self.runtime, self.val_x, self.val_y, self.val_sizes,
                          self.cfg.batch_size, self.evaluation.map_score_threshold)["none"]
        self.row = self.row | scores
        return scores

    def end_epoch(self, epoch: int, monitored: float | None) -> None:
        """The schedule steps per update; this only checks for a dead detector, before the epoch is saved, so that
        `last` never holds a dead epoch to resume from."""
        # the earliest patience can stop a run whose mAP stays 0 is epoch 1 + patience: check by then
        last = min(self.dead_after or 0, self.cfg.epochs, *([1 + self.cfg.patience] if self.cfg.patience else []))
        if self.dead_after is not None and epoch == last:
            reason = dead_reason(self.row, self.kind)
            if reason is not None:
                raise DeadDetector(reason, epoch, self.row)

    def describe(self, row: dict) -> str:
        if self.torchvision:
            terms = ", ".join(f"{k} {row['train_' + k]:.4f}" for k in self.loss_terms if "train_" + k in row)
            return (f"loss {row['train_loss']:.4f} ({terms}) | val mAP@0.5 {row['map_50']:.3f} mAP {row['map']:.3f} "
                    f"({row['seconds']:.0f} s)")
        return (f"loss {row['train_loss']:.4f} class err {row['train_class_err']:.2e} "
                f"bbox mae {row['train_bbox_mae']:.2e} | val class err {row['val_class_err']:.2e} "
                f"bbox mae {row['val_bbox_mae']:.2e} mAP@0.5 {row['map_50']:.3f} mAP {row['map']:.3f} "
                f"({row['seconds']:.0f} s)")

    def fit(self) -> list[dict]:
        """With train.patience: stop after that many epochs without a better validation mAP@0.5 and end with the
        best epoch's weights (best.safetensors); without it every epoch runs and the last weights stay."""
        saver = loop.CheckpointSaver(self.run_dir, self.fingerprint)
        patience = self.cfg.patience
        self.progress = loop.fit(self, saver, epochs=self.cfg.epochs, seed=self.cfg.seed, label="detect:",
                                 monitor="map_50" if patience else None, early_stopping=patience,
                                 diverged_fix="lower detect.train.lr")
        if patience:
            self.model.load_state_dict(load_file(str(self.run_dir / "best.safetensors")))
        return self.history

    @property
    def best_epoch(self) -> int:
        """The epoch whose weights the model ends with."""
        return self.progress.best_epoch if self.cfg.patience else self.progress.epoch
