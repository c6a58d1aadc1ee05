"""Partial copies at scan time: query windows and frames searched against the region index, aggregated per
training image."""
