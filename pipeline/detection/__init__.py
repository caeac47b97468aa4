"""Detection track (issue: anchors, IoU, labelling, NMS, TinySSD). Box machinery so far: boxes.py."""
