"""Detection track: the folder reader (data.py), box machinery (boxes.py: anchors, IoU, labelling,
offsets, NMS; d2l's loops in reference.py as the yardstick), the TinySSD model (tinyssd.py),
training (fit.py), decoding, mAP and galleries (infer.py) and a generated banana-style competition
(bananas.py). The stage that chains them is pipeline/stages/detect.py (`make detect`)."""
