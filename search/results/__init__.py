"""Scan results: the matches dataset written one part per query chunk, its summary, and SQL over it."""
