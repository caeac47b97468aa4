"""The one training machinery: models, augmentation, the loop, checkpoints, runtime, TTA."""
