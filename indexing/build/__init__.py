"""Building the index from embedding shards: choose the FAISS index (planner), learn the post-processing
(whitening, score normalisation), train once and fill index shards, merge small shards."""
