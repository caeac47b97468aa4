"""Detection track, in progress: box machinery (boxes.py, with the course's loops in reference.py
as the yardstick) and the TinySSD model (tinyssd.py). Data, training, mAP and `make detect` are to come."""
