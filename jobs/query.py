"""``copyscan query RUN [RUN ...] "SQL"`` / ``python -m copyscan.jobs.query``: SQL over scan results (DuckDB).

The SQL sees ``matches`` (every match of the runs given, with a ``run`` column) and ``runs`` (one row per run
from its summary.json); see search/results/sql.py. Prints the result as a table, or writes it with ``--out``
(.parquet, .csv or .json). Runs in this process; no cluster needed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from copyscan.jobs._runtime import Job


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="scan output URL(s), then the SQL")
    parser.add_argument("--out", help="write the result here (.parquet, .csv or .json) instead of printing")
    parser.add_argument("--limit", type=int, default=50, help="rows printed (default 50)")
    parser.add_argument("-v", "--verbose", action="store_true")


def _body(args: argparse.Namespace) -> None:
    from copyscan.indexing.errors import CopyscanError
    from copyscan.search.results.sql import run_query

    if len(args.runs) < 2:
        raise CopyscanError('give the scan output(s), then the SQL: copyscan query RUN "SELECT ..."')
    table = run_query(args.runs[:-1], args.runs[-1])
    if args.out:
        _write(table, args.out)
        print(f"{table.num_rows} row(s) written to {args.out}")
    else:
        print(_format(table, args.limit))


def _write(table: Any, out: str) -> None:
    """``table`` (a pyarrow.Table) as .parquet, .csv or .json (a list of row objects), by ``out``'s suffix."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from copyscan.indexing.errors import CopyscanError

    if out.endswith(".parquet"):
        pq.write_table(table, out)
    elif out.endswith(".csv"):
        pcsv.write_csv(table, out)
    elif out.endswith(".json"):
        import json

        with open(out, "w") as f:
            json.dump(table.to_pylist(), f, indent=1, default=str)
    else:
        raise CopyscanError(f"--out must end in .parquet, .csv or .json, not {out}")


def _format(table, limit: int) -> str:
    names = table.column_names
    rows = [[_cell(v) for v in row.values()] for row in table.slice(0, limit).to_pylist()]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if table.num_rows > limit:
        lines.append(f"... {table.num_rows - limit} more row(s) (--limit, or --out FILE)")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    text = "" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


JOB = Job(
    name="query",
    summary='SQL over scan results with DuckDB: copyscan query RUN [RUN ...] "SELECT ..."',
    description=__doc__,
    arguments=_arguments,
    body=_body,
    uses_ray=False,
    config_arguments=False,  # no config: the runs and the SQL are the whole input
)

if __name__ == "__main__":
    sys.exit(JOB.main())
