"""``copyscan report``: replication statistics, duplicate counts, the nightly history and the HTML report."""
