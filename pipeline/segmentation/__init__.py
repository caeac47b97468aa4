"""Segmentation track's library (masks in, run-length encodings out): Kaggle's RLE (rle.py), Dice, IoU and the
instance mAP over IoU thresholds (metrics.py), the folder reader (data.py), a generated competition
(generate.py, `make-masks`), the masks as training arrays (arrays.py), smp networks (models.py), training on the
shared loop (fit.py), prediction with flip views (infer.py), blends of several members chosen on OOF (blend.py),
post-processing chosen on OOF (post.py), the submission and its checks (submit.py) and the OOF gallery
(gallery.py). The stage is pipeline/stages/segment.py."""
