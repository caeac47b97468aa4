"""Segmentation track's library (masks in, run-length encodings out): Kaggle's RLE (rle.py), Dice, IoU and the
instance mAP over IoU thresholds (metrics.py) and the folder reader (data.py). Training and the stage that
chains them are not built yet."""
