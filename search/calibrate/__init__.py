"""Calibration: score thresholds for a chosen precision, from the index's own images (whole copies) and from
training images pasted into outside scenes (partial copies)."""
