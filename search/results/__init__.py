"""Scan results: the matches dataset written one part per query chunk, its summary, and SQL over it.

``matches`` (the table and its schema), ``write`` (a chunk's files and marker), ``summary`` (run-level
counts from the markers), ``dataset`` (reading the matches: ``open``, ``open_matches``, the documented
analytics API, importable from here: ``from copyscan.search import results; results.open(URL)``), ``sql``
(DuckDB).
"""

from copyscan.search.results.dataset import open, open_matches  # the documented analytics API

__all__ = ["open", "open_matches"]
