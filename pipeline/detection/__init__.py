"""Detection track, in progress: box machinery (boxes.py, with the course's loops in reference.py
as the yardstick) the TinySSD model (tinyssd.py) and a generated banana-style dataset (bananas.py). Training, mAP
and `make detect` are to come."""
