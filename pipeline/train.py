"""Train stage: every backbone on every fold, AdamW + cosine schedule with warmup, best checkpoint kept.

Per (backbone, fold) it writes under WORK/runs/<backbone>/fold<k>/: best.safetensors (weights),
best.json (stamp + metadata: classes, folds hash, config hash, epoch, metric, normalisation),
history.csv, curves.png and the resolved config. A finished run is skipped on the next call.
"""

from __future__ import annotations

import time

import albumentations as A
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import folds as folds_stage
from .artifacts import atomic_write, fingerprint, is_done, read_json, write_csv, write_stamp, write_text
from .cache import decoded_images, input_channels
from .config import TrainConfig, config_hash, to_yaml
from .context import Context
from .errors import PipelineError
from .metrics import GREATER_IS_BETTER, is_better, score
from .models import build_model
from .plots import plot_curves


def augmentations(cfg: TrainConfig, seed: int) -> A.Compose:
    ops = []
    if cfg.augment == "light":
        ops.append(A.Affine(scale=(0.9, 1.1), translate_percent=(-0.08, 0.08), rotate=(-10, 10), p=0.7))
    if cfg.hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    return A.Compose(ops, seed=seed)


class ArrayDataset(Dataset):
    """Rows of the decoded-image cache, augmented with albumentations, returned as uint8 CHW tensors."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform: A.Compose | None = None):
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = np.array(self.images[i])
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), int(self.targets[i])


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def to_input(x: torch.Tensor, norm: dict, device: torch.device) -> torch.Tensor:
    """uint8 NCHW -> normalised float on device (dataset mean/std, kept in the checkpoint metadata)."""
    mean = torch.tensor(norm["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"], device=device).view(1, -1, 1, 1)
    x = x.to(device, non_blocking=True).float().div_(255.0)
    out = (x - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else out


def dataset_norm(images: np.ndarray, chunk: int = 1024) -> dict:
    """Per-channel mean and std of the training images, in chunks so a large memmap never becomes float64."""
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start:start + chunk], dtype=np.float64).reshape(-1, images.shape[-1]) / 255.0
        total, total_sq, count = total + block.sum(0), total_sq + (block**2).sum(0), count + len(block)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return {"mean": mean.round(6).tolist(), "std": np.maximum(std, 1e-3).round(6).tolist()}


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: np.ndarray, norm: dict, device: torch.device, batch_size: int) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[start:start + batch_size])).permute(0, 3, 1, 2)
        out.append(model(to_input(x, norm, device)).float().softmax(1).cpu())
    return torch.cat(out).numpy()


def _train_epoch(model, loader, opt, sched, norm, device, amp, updates, desc) -> tuple[float, float, int]:
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=None)
    t0 = time.perf_counter()
    for x, y in bar:
        x, y = to_input(x, norm, device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        updates += 1
        sched.step_update(updates)
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}",
                        img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    return total_loss / seen, correct / seen, updates


def train_fold(ctx: Context, backbone: str, fold: int, data: dict) -> dict:
    """Train one backbone on one fold; skipped when its stamp matches."""
    cfg, tcfg = ctx.cfg, ctx.cfg.train
    run_dir = ctx.work_dir / "runs" / backbone / f"fold{fold}"
    fp = fingerprint("train", data["folds_hash"], backbone, fold, data["channels"], cfg.model.model_dump(exclude={"backbones"}),
                     tcfg.model_dump(exclude={"folds", "num_workers", "threads", "device"}))
    if is_done(run_dir / "best.json", fp):
        meta = read_json(run_dir / "best.json")
        print(f"train: {backbone} fold {fold} up to date ({cfg.competition.metric} {meta['metric']:.4f})")
        return meta
    frame, images = data["frame"], data["images"]
    is_val = (frame["fold"] == fold).to_numpy()
    train_x, train_y = images[~is_val], frame["y"].to_numpy()[~is_val]
    val_x, val_y = images[is_val], frame["y"].to_numpy()[is_val]
    seed = tcfg.seed * 1000 + fold
    torch.manual_seed(seed)
    device = pick_device(tcfg.device)
    model = build_model(backbone, len(data["classes"]), data["channels"], cfg.model.pretrained, cfg.model.drop_rate).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(ArrayDataset(train_x, train_y, augmentations(tcfg, seed)), batch_size=tcfg.batch_size, shuffle=True,
                        drop_last=len(train_x) > tcfg.batch_size, num_workers=tcfg.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=tcfg.num_workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    opt = create_optimizer_v2(model, "adamw", lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    steps = len(loader)
    sched = CosineLRScheduler(opt, t_initial=tcfg.epochs * steps, lr_min=tcfg.min_lr, warmup_t=int(tcfg.warmup_epochs * steps),
                              warmup_lr_init=tcfg.lr * 0.01, t_in_epochs=False)
    amp = tcfg.amp and device.type == "cuda"
    metric, history, best, updates = cfg.competition.metric, [], None, 0
    norm = data["norm"]
    for epoch in range(1, tcfg.epochs + 1):
        t0 = time.perf_counter()
        loss, acc, updates = _train_epoch(model, loader, opt, sched, norm, device, amp, updates,
                                          f"train {backbone} fold {fold} epoch {epoch}/{tcfg.epochs}")
        proba = predict_proba(model, val_x, norm, device, tcfg.batch_size * 2)
        val = score(metric, val_y, proba)
        history.append({"epoch": epoch, "train_loss": loss, "train_acc": acc, "val_acc": score("accuracy", val_y, proba),
                        f"val_{metric}": val, "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0})
        if is_better(metric, val, best):
            best = val
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            atomic_write(run_dir / "best.safetensors", lambda tmp, s=state: save_file(s, str(tmp)))
            best_epoch = epoch
        print(f"train: {backbone} fold {fold} epoch {epoch}: loss {loss:.4f} acc {acc:.4f} val {metric} {val:.4f}")
    write_csv(run_dir / "history.csv", pd.DataFrame(history))
    plot_curves(pd.DataFrame(history), run_dir / "curves.png", f"{backbone} fold {fold}")
    write_text(run_dir / "config.yaml", to_yaml(cfg))
    meta = {"backbone": backbone, "fold": fold, "epoch": best_epoch, "metric": best, "metric_name": metric,
            "greater_is_better": GREATER_IS_BETTER[metric], "classes": data["classes"], "folds_hash": data["folds_hash"],
            "config_hash": config_hash(cfg.model, tcfg), "in_chans": data["channels"], "image_size": tcfg.image_size,
            "norm": norm, "pretrained": cfg.model.pretrained, "drop_rate": cfg.model.drop_rate}
    write_stamp(run_dir / "best.json", fp, **meta)
    return meta


def load_training_data(ctx: Context) -> dict:
    """folds.csv, its stamp and the decoded-image cache: what every fold run shares."""
    stamp = read_json(ctx.work_dir / "folds.json")
    frame = pd.read_csv(ctx.work_dir / "folds.csv", dtype={"id": str, "label": str}, keep_default_na=False)
    channels = input_channels(ctx)
    images = decoded_images(ctx, list(frame["path"]), ctx.cfg.train.image_size, channels, "train")
    return {"frame": frame, "images": images, "channels": channels, "classes": stamp["classes"],
            "folds_hash": stamp["folds_hash"], "n_splits": stamp["n_splits"], "norm": dataset_norm(images)}


def folds_to_train(requested: list[int] | None, n_splits: int) -> list[int]:
    chosen = list(range(n_splits)) if requested is None else requested
    bad = [k for k in chosen if not 0 <= k < n_splits]
    if bad:
        raise PipelineError(f"train.folds: folds {bad} do not exist; folds run from 0 to {n_splits - 1}")
    return chosen


def run(ctx: Context) -> dict:
    folds_stage.run(ctx)
    if ctx.cfg.train.threads:
        torch.set_num_threads(ctx.cfg.train.threads)
    data = load_training_data(ctx)
    results = {}
    for backbone in ctx.cfg.model.backbones:
        for fold in folds_to_train(ctx.cfg.train.folds, data["n_splits"]):
            results[(backbone, fold)] = train_fold(ctx, backbone, fold, data)["metric"]
    return results
