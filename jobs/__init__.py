"""Thin job entrypoints and the ``copyscan`` CLI. Only this package calls ``ray.init``."""
