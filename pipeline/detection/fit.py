"""TinySSD training as in the course: cross-entropy over anchor classes + L1 over masked offsets.

Per epoch it reports the course's training metrics (class error over all anchors, bbox MAE over
all offset entries, masked ones counted as zero error) and the same two plus mAP@0.5 and COCO
mAP@[.5:.95] on the validation images. Like the classification engine, every epoch reseeds its
randomness from (seed, epoch) and `last.*` holds weights, optimizer, scheduler and history, so a
killed run resumes from its last finished epoch with the same result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from .. import checkpoint
from ..config import DetectConfig
from .boxes import mirror_boxes, multibox_target
from .infer import Detector, mean_average_precision
from .tinyssd import outputs


def hflip(images: torch.Tensor, labels: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror the images where `flip` (B,) is true, with their boxes (x1, x2 -> 1 - x2, 1 - x1)."""
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    mirrored = torch.cat((labels[..., :1], mirror_boxes(labels[..., 1:])), -1)
    keep = ~flip[:, None, None] | (labels[..., :1] < 0)  # padding rows stay as they are
    return images, torch.where(keep, labels, mirrored)


def ssd_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks, negative_ratio: float | None = None) -> torch.Tensor:
    """negative_ratio None: the course's calc_loss (per image, mean CE over all anchors + mean L1 over all
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
    """[wrong anchor classes, anchors, summed masked |offset error|, offset entries], the course's cls_eval/bbox_eval."""
    wrong = (cls_preds.argmax(-1) != cls_labels).sum().double()
    l1 = ((bbox_labels - bbox_preds) * bbox_masks).abs().sum().double()
    return torch.stack([wrong, wrong.new_tensor(cls_labels.numel()), l1, l1.new_tensor(bbox_labels.numel())])


def forward(model, images: torch.Tensor, labels: torch.Tensor, device: torch.device, cfg: DetectConfig):
    """Network outputs in float32 and the course's training targets for them."""
    anchors, cls_preds, bbox_preds = outputs(model, images, device, cfg)
    return anchors, cls_preds, bbox_preds, multibox_target(anchors, labels.to(device))


@torch.no_grad()
def evaluate(model, cfg: DetectConfig, device: torch.device, images: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor,
             ttas: tuple[str, ...] = ("none",)) -> dict[str, dict]:
    """Per TTA option: class error and bbox MAE (the course's definitions, on the plain images), mAP@0.5 and
    COCO mAP with the current decoding settings. The plain forward pass is shared by all options."""
    model.eval()
    detectors = {t: Detector(model, cfg, device, t) for t in ttas}
    counts, detections = torch.zeros(4, dtype=torch.float64), {t: [] for t in ttas}
    for idx in torch.arange(len(images)).split(cfg.batch_size * 2):
        anchors, cls_preds, bbox_preds, (bbox_labels, bbox_masks, cls_labels) = forward(model, images[idx], labels[idx], device, cfg)
        counts += error_counts(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks).cpu()
        for t, detector in detectors.items():
            detections[t] += detector.select(*detector.run(images[idx], first=(anchors, cls_preds, bbox_preds)), sizes[idx], cfg.map_score_threshold)
    course = {"val_class_err": float(counts[0] / counts[1]), "val_bbox_mae": float(counts[2] / counts[3])}
    return {t: course | mean_average_precision(detections[t], labels, sizes) for t in ttas}


@dataclass
class DetectionTrainer:
    model: torch.nn.Module
    cfg: DetectConfig
    train_x: torch.Tensor  # (N, 3, S, S) uint8
    train_y: torch.Tensor  # (N, G, 5)
    val_x: torch.Tensor
    val_y: torch.Tensor
    val_sizes: torch.Tensor  # (N, 2) width, height in pixels, for mAP in image coordinates
    run_dir: Path
    fingerprint: str
    device: torch.device
    history: list = field(default_factory=list)

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.steps = (len(self.train_x) + cfg.batch_size - 1) // cfg.batch_size
        lr_min = cfg.lr / 100 if cfg.schedule == "cosine" else cfg.lr
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=cfg.epochs * self.steps, lr_min=lr_min, t_in_epochs=False)
        self.negative_ratio = cfg.negative_ratio if cfg.loss == "ssd" else None
        self.epoch, self.updates = 0, 0

    def resume(self) -> bool:
        found = checkpoint.load_last(self.run_dir, self.fingerprint)
        if found is None:
            return False
        tensors, state = found
        self.model.load_state_dict(checkpoint.unprefixed("model", tensors))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.updates, self.history = state["epoch"], state["updates"], state["history"]
        return True

    def save_last(self) -> None:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "updates": self.updates, "history": self.history}
        checkpoint.save_last(self.run_dir, checkpoint.prefixed("model", self.model), state, self.epoch, self.fingerprint)

    def train_epoch(self) -> tuple[float, torch.Tensor]:
        self.model.train()
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.epoch)
        torch.manual_seed(self.cfg.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.train_x), generator=gen)
        total, counts, seen, t0 = 0.0, 0.0, 0, time.perf_counter()
        bar = tqdm(order.split(self.cfg.batch_size), desc=f"detect: epoch {self.epoch}/{self.cfg.epochs}", unit="batch", leave=False, disable=None)
        for idx in bar:
            images, labels = self.train_x[idx], self.train_y[idx]
            if self.cfg.hflip:
                images, labels = hflip(images, labels, torch.rand(len(idx), generator=gen) < 0.5)
            _, cls_preds, bbox_preds, (bbox_labels, bbox_masks, cls_labels) = forward(self.model, images, labels, self.device, self.cfg)
            loss = ssd_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks, self.negative_ratio)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.updates += 1
            self.scheduler.step_update(self.updates)
            total, seen = total + loss.detach() * len(idx), seen + len(idx)  # device tensors: no host sync per batch
            counts = counts + error_counts(cls_preds.detach(), cls_labels, bbox_preds.detach(), bbox_labels, bbox_masks)
            if not bar.disable and bar.n % 10 == 0:
                bar.set_postfix(loss=f"{total.item() / seen:.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        return float(total) / seen, counts.cpu()

    def validate(self) -> dict:
        return evaluate(self.model, self.cfg, self.device, self.val_x, self.val_y, self.val_sizes)["none"]

    def fit(self) -> list[dict]:
        if self.resume():
            print(f"detect: resumes after epoch {self.epoch}")
        while self.epoch < self.cfg.epochs:
            self.epoch += 1
            t0 = time.perf_counter()
            loss, counts = self.train_epoch()
            row = {"epoch": self.epoch, "train_loss": loss, "train_class_err": float(counts[0] / counts[1]),
                   "train_bbox_mae": float(counts[2] / counts[3]), **self.validate(),
                   "lr": self.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            self.history.append(row)
            self.save_last()
            print(f"detect: epoch {self.epoch}: loss {loss:.4f} class err {row['train_class_err']:.2e} bbox mae {row['train_bbox_mae']:.2e} | "
                  f"val class err {row['val_class_err']:.2e} bbox mae {row['val_bbox_mae']:.2e} mAP@0.5 {row['map_50']:.3f} "
                  f"mAP {row['map']:.3f} ({row['seconds']:.0f} s)")
        return self.history
