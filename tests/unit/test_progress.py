"""Progress lines: an ETA past a day prints as hours, not wrapped to the time of day."""

from copyscan.indexing.runtime.progress import Progress, duration_text


def test_duration_text_never_wraps_at_a_day():
    assert duration_text(0) == "0:00:00"
    assert duration_text(310.4) == "0:05:10"
    assert duration_text(86_399) == "23:59:59"
    assert duration_text(100_000) == "27:46:40"  # strftime("%H:%M:%S") gave 03:46:40
    assert duration_text(-3) == "0:00:00"


def test_progress_line_shows_a_long_eta_in_hours():
    progress = Progress("scan", 1_000_000, unit="chunks", item="queries")
    progress.start -= 100.0  # one chunk took 100 s: 999,999 more take ~1,157 days
    progress.units, progress.items = 1, 1_000
    line = progress.line()
    assert line.startswith("scan: 1/1000000 chunks, 1,000 queries, ")
    hours = int(line.rsplit("ETA ", 1)[1].split(":")[0])
    assert 27_700 <= hours <= 27_800
