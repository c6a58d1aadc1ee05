"""The report's parquet outputs: histograms, every similarity value, and the near-duplicate counts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from copyscan.indexing.store import layout, storage
from copyscan.search.report import stats
from copyscan.search.report.config import COLUMNS
from copyscan.search.report.duplicates import Duplicates


def write_tables(
    out: str,
    gen: dict[str, np.ndarray],
    top: pa.Table,
    tt: dict[str, np.ndarray],
    duplicates: Duplicates,
    so: dict[str, Any] | None = None,
) -> None:
    """Writes ``out``/histograms.parquet, similarities.parquet and duplicates.parquet.

    gen: column → (nq,) float64 top-1 values of the generations (the rows of ``top``, rank 0);
    tt: ``neighbours.train_train``'s result.
    """
    storage.write_parquet(storage.join(out, layout.REPORT_HISTOGRAMS_NAME), histograms_table(gen, tt), so)
    storage.write_parquet(
        storage.join(out, layout.REPORT_SIMILARITIES_NAME), similarities_table(gen, top, tt), so
    )
    storage.write_parquet(storage.join(out, layout.REPORT_DUPLICATES_NAME), duplicates_table(duplicates), so)


def histograms_table(gen: dict[str, np.ndarray], tt: dict[str, np.ndarray]) -> pa.Table:
    """column, distribution, bin_lo, bin_hi, count, density: ``stats.histogram`` of every column of both
    distributions."""
    parts = []
    for c in COLUMNS:
        for name, values in (("gen_train", gen[c]), ("train_train", tt[c])):
            h = stats.histogram(values)
            n = len(h["counts"])
            parts.append(
                pa.table(
                    {
                        "column": pa.array([c] * n),
                        "distribution": pa.array([name] * n),
                        "bin_lo": h["edges"][:-1],
                        "bin_hi": h["edges"][1:],
                        "count": h["counts"],
                        "density": h["density"],
                    }
                )
            )
    return pa.concat_tables(parts)


def similarities_table(gen: dict[str, np.ndarray], top: pa.Table, tt: dict[str, np.ndarray]) -> pa.Table:
    """One row per value: distribution (gen_train | train_train), id (query id or packed training id as
    text), neighbour (packed training id), the score columns as float32."""
    gen_rows = pa.table(
        {
            "distribution": pa.array(["gen_train"] * len(top)),
            "id": top.column("query_id").cast(pa.string()),
            "neighbour": top.column("train_id"),
            **{c: pa.array(gen[c], pa.float32()) for c in COLUMNS},
        }
    )
    train_rows = pa.table(
        {
            "distribution": pa.array(["train_train"] * len(tt["id"])),
            "id": pa.array([str(i) for i in tt["id"]], pa.string()),
            "neighbour": pa.array(tt["neighbour"], pa.int64()),
            **{c: pa.array(tt[c], pa.float32()) for c in COLUMNS},
        }
    )
    return pa.concat_tables([gen_rows, train_rows])


def duplicates_table(duplicates: Duplicates) -> pa.Table:
    """group (matched | random), train_id, duplicates: one row per training image counted."""
    d = duplicates
    return pa.table(
        {
            "group": pa.array(["matched"] * len(d.matched_ids) + ["random"] * len(d.random_ids)),
            "train_id": pa.array(np.concatenate([d.matched_ids, d.random_ids]).astype(np.int64)),
            "duplicates": pa.array(np.concatenate([d.matched_counts, d.random_counts]).astype(np.int64)),
        }
    )
