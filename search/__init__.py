"""Fan-out search of query images against a sharded index, merging, re-ranking and results."""
