"""``copyscan generate``: a diffusers text-to-image checkpoint run on prompts, with Wen et al.'s
memorisation score per generation (config, prompts, sampling, shards; the Ray layer in
``generate_ray.py``)."""
