"""Segmentation track's library (masks in, run-length encodings out): Kaggle's RLE (rle.py), Dice, IoU and the
instance mAP over IoU thresholds (metrics.py), the folder reader (data.py) and a generated competition
(generate.py, `make-masks`). Training and the stage that chains them are not built yet."""
