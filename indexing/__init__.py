"""Streaming LAION-format shards, embedding them, and building sharded FAISS indexes.

Library code: importable without Ray. The Ray glue lives in the modules named ``*_ray.py``.
"""
