"""Reading a scan's results: its matches as a pyarrow dataset or a DuckDB relation (the analytics API,
``from copyscan.search import results; results.open(URL)``)."""

from __future__ import annotations

from typing import Any

import pyarrow.dataset as pads

from copyscan.indexing.store import layout, storage
from copyscan.search.results.matches import MATCHES_SCHEMA


def open_matches(out: str, storage_options: storage.StorageOptions | None = None) -> pads.Dataset:
    """The matches of a scan as a pyarrow dataset (filter/aggregate without loading everything)."""
    fs, path = storage.get_fs(layout.matches_dir(out), storage_options)
    return pads.dataset(path, filesystem=fs, format="parquet", schema=MATCHES_SCHEMA)


def open(  # noqa: A001 - the documented entry point: ``copyscan.search.results.open(url)``
    out: str,
    storage_options: storage.StorageOptions | None = None,
    engine: str = "arrow",
    connection: Any = None,
) -> Any:
    """A scan's matches for batch analytics: a pyarrow dataset (``engine="arrow"``) or a DuckDB relation
    (``engine="duckdb"``, on ``connection`` or a new in-memory one). Nothing is read until it is queried."""
    dataset = open_matches(out, storage_options)
    if engine == "arrow":
        return dataset
    if engine == "duckdb":
        import duckdb

        return (connection or duckdb.connect()).from_arrow(dataset)
    raise ValueError(f"engine must be 'arrow' or 'duckdb', not {engine!r}")
