"""Numbers on predictions: metrics and tasks, thresholds, blends, pseudo-labels, submissions."""
