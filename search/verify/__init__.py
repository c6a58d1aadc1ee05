"""Verification of scan matches on re-fetched originals: pixel distances (Carlini et al.) and dense
localisation of partial copies."""
