"""Approximate nearest-neighbour search over a sharded index: coarse assignment, top-k and range search with
exact re-ranking, merging top-k lists, score normalisation."""
