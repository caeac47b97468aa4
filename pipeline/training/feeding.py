"""Feeding the network: the decoded-image array as a dataset, the seeded epoch order, the loader and its workers.

Every training batch is decided in the main process: EpochSampler pairs each index with an augmentation seed
from (seed, epoch, rank), and ArrayDataset reseeds the augmentation from it, so any number of loader workers,
persistent or not, and a resumed run give the batches of one uninterrupted process. `predict_proba` runs a
network over the same uint8 arrays in batches (validation).
"""

from __future__ import annotations

import random

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from pipeline.training import distributed
from pipeline.training.heads import Head
from pipeline.training.runtime import Runtime


class ArrayDataset(Dataset):
    """Rows of the decoded-image cache, augmented with albumentations, returned as uint8 CHW tensors.

    Indices are plain ints or (int, seed) pairs from EpochSampler: a batch of pairs reseeds the augmentation
    from its first pair's seed, so what a batch looks like is decided in the main process, not by the worker
    that happens to build it (and not by that worker's history).
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform=None):
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.images)

    @property
    def augments(self) -> bool:
        return self.transform is not None and bool(self.transform.transforms)

    def __getitem__(self, i):
        if isinstance(i, tuple):
            i, seed = i
            self._reseed(seed)
        img = np.array(self.images[i])
        if self.augments:
            img = self.transform(image=img)["image"]
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), torch.as_tensor(self.targets[i])

    def _reseed(self, seed: int) -> None:
        """One numpy and one python generator shared by every transform of the pipeline: albumentations'
        set_random_seed gives each transform its own generator with the same seed, whose first draws then
        coincide (a flip with p=0.5 would always come with a crop with p=0.7)."""
        if self.augments:
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __getitems__(self, indices: list):
        """A whole batch in one read of the array (the DataLoader calls this instead of one item at a time)."""
        if indices and isinstance(indices[0], tuple):
            self._reseed(indices[0][1])
            indices = [i for i, _ in indices]
        if self.augments:
            return tuple(default_collate([self[i] for i in indices]))
        idx = np.asarray(indices)
        order = np.argsort(idx)  # sorted reads are sequential on a memmap
        batch = np.empty((len(idx), *self.images.shape[1:]), dtype=self.images.dtype)
        batch[order] = self.images[idx[order]]
        return (torch.from_numpy(batch).permute(0, 3, 1, 2),
                torch.as_tensor(np.asarray(self.targets)[idx]))


class EpochSampler(Sampler):
    """This rank's shuffled indices of one epoch, each paired with an augmentation seed; both follow from
    (seed, epoch, rank) alone, set in the main process and sent to the workers with every batch.

    torch seeds a worker once, when it starts; a persistent worker carries its generator's state from one
    epoch into the next, which a resumed run (fresh workers) cannot repeat, and the state depends on which
    worker built which batch. With the seeds in the indices, a batch is the same whoever builds it: any
    number of workers, persistent or not, and a resumed run give the batches of one uninterrupted process.
    Under torchrun every rank draws the one-process permutation and keeps its share
    (distributed.shard_order), so step i of all ranks together is one process's batch i.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, drop_last: bool = False):
        self.n, self.epoch_seed, self.rank, self.world, self.drop_last = n, seed, rank, world, drop_last

    def set_epoch(self, epoch: int, epoch_seed: int) -> None:
        self.epoch_seed = epoch_seed

    def __len__(self) -> int:
        return len(distributed.shard_order(range(self.n), self.rank, self.world, self.drop_last))

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch_seed)).tolist()
        seeds = np.random.default_rng([self.epoch_seed % 2**63, self.rank]).integers(0, 2**63, self.n).tolist()
        mine = distributed.shard_order(list(zip(order, seeds, strict=True)), self.rank, self.world, self.drop_last)
        return iter(mine)


def collate(batch):
    """Batches from ArrayDataset.__getitems__ arrive ready; anything else goes through torch's default."""
    return batch if isinstance(batch, tuple) else default_collate(batch)


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: np.ndarray, norm: dict, runtime: Runtime,
                  batch_size: int, head: Head | None = None) -> np.ndarray:
    """Class probabilities of uint8 NHWC images (or the head's predictions), with the runtime's autocast and
    memory format."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[start:start + batch_size])).permute(0, 3, 1, 2)
        with runtime.autocasting():
            logits = model(runtime.to_input(x, norm))
        out.append((logits.float().softmax(1) if head is None else head.activate(logits)).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def loader(dataset: Dataset, batch_size: int, sampler: Sampler, drop_last: bool, seed: int, rt: Runtime) -> DataLoader:
    """The training loader: `sampler` decides the batches, the runtime the workers (loader_options). It has its own
    generator: the loader's draw of the workers' base seed (once with persistent workers) must not move torch's
    global one, which the epochs reseed."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed), **loader_options(rt))


def loader_options(rt: Runtime) -> dict:
    """DataLoader keywords of the runtime's workers: persistent (started once per run, not per epoch; what a
    batch holds comes from EpochSampler, so their state does not matter), a few batches prefetched each,
    pinned batches on CUDA (copied with non_blocking=True by Runtime.to_input)."""
    workers = rt.num_workers
    if workers:
        # One OpenCV thread (albumentations' kernels), set here in the parent so that the forked workers inherit
        # it: the workers are the parallelism, and OpenCV's own pool (as many threads as cores) would oversubscribe
        # the cores. Calling cv2.setNumThreads in a forked worker hangs once the parent has used OpenCV's pool
        # (the child inherits a pool whose threads did not survive the fork). The parent does no augmentation
        # while it has workers.
        cv2.setNumThreads(1)
    return {"num_workers": workers, "persistent_workers": workers > 0, "prefetch_factor": 4 if workers else None,
            "pin_memory": rt.device.type == "cuda", "worker_init_fn": _init_worker if workers else None}


def _init_worker(worker_id: int) -> None:
    """numpy's and python's global generators follow torch's per-worker seed, for any transform that uses them
    (the pipeline's own are reseeded per batch by ArrayDataset). Threads: loader_options."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
