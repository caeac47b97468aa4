"""The detector's learning-rate warmup."""

import pytest
import torch

from pipeline.core.config import DetectTrainConfig
from pipeline.detection.fit import WARMUP_FACTOR, DetectionTrainer
from pipeline.detection.tinyssd import TinySSD
from pipeline.training.runtime import Runtime


@pytest.fixture(autouse=True)
def one_thread():
    """Convolutions this small run fastest in one thread (test_detection_models)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(tmp_path, **train) -> DetectionTrainer:
    """TinySSD on 12 noise images, 3 updates an epoch."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 255, (12, 3, 64, 64), dtype=torch.uint8, generator=gen)
    xy = torch.rand(12, 1, 2, generator=gen) * 0.5
    y = torch.cat((torch.zeros(12, 1, 1), xy, xy + 0.3), -1)
    torch.manual_seed(0)
    cfg = DetectTrainConfig(**{"batch_size": 5, "image_size": 64, "lr": 0.05} | train)
    sizes = torch.tensor([[64.0, 64.0]] * 4)
    return DetectionTrainer(TinySSD(1), cfg, x, y, x[:4], y[:4], sizes, tmp_path, "fp", Runtime())


def test_warmup_rises_linearly_to_the_lr_then_the_cosine_ends_at_a_hundredth(tmp_path):
    trainer = _trainer(tmp_path, epochs=4, warmup_epochs=1)
    updater, lr = trainer.updater, trainer.cfg.lr
    assert trainer.warmup_steps == 3 and updater.lr == pytest.approx(lr * WARMUP_FACTOR)  # before the first update
    seen = []
    for t in range(1, 13):
        updater.scheduler.step_update(t)
        seen.append(updater.lr)
    assert seen[:3] == pytest.approx([lr * WARMUP_FACTOR + t * lr * (1 - WARMUP_FACTOR) / 3 for t in (1, 2, 3)])
    assert seen[2] == pytest.approx(lr) and seen[3] < lr  # the peak when the warmup ends, then the cosine
    assert all(a > b for a, b in zip(seen[2:], seen[3:], strict=False)) and seen[-1] == pytest.approx(lr / 100)
    assert _trainer(tmp_path, epochs=4, warmup_epochs=0).updater.lr == lr  # none: the lr from the first update

    trained = _trainer(tmp_path, epochs=4, warmup_epochs=1)  # a real epoch: its 3 updates are the warmup
    trained.train_epoch(1)
    assert trained.updater.updates == 3 and trained.updater.lr == pytest.approx(lr)
