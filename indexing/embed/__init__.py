"""The embedding stage: decode samples (with the augmented copies for learned whitening), embed them, write
per-shard outputs with a marker last; CLIP embeddings imported without an image; its Ray glue."""
