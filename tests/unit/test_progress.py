"""Progress lines: an ETA past a day prints as hours, not wrapped to the time of day; progress within a chunk."""

import re
import time

import numpy as np

from copyscan.indexing.runtime.progress import Progress, WithinProgress, duration_text


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


def test_within_progress_lines_for_a_long_chunk():
    lines: list[str] = []
    progress = WithinProgress("query chunk 00003", 1_000_000_000_000, lines.append, every=0.0)
    time.sleep(0.01)
    progress(64)
    progress(64)
    assert len(lines) == 2
    label, rest = lines[1].split(": ", 1)
    assert label == "query chunk 00003" and rest.startswith("128/1,000,000,000,000 queries, ")
    # a trillion queries at this pace take years: the ETA is in hours, past any day boundary
    hours = int(re.search(r"ETA (\d+):\d\d:\d\d$", lines[1]).group(1))
    assert hours > 24


def test_within_progress_is_quiet_for_short_work_and_at_the_end():
    lines: list[str] = []
    quiet = WithinProgress("query chunk 00000", 100, lines.append, every=60.0)
    quiet(64)
    quiet(36)
    at_end = WithinProgress("query chunk 00001", 100, lines.append, every=0.0)
    at_end(100)
    tar = WithinProgress("query chunk 00002", None, lines.append, every=0.0)
    tar(10)
    assert (
        lines == [lines[-1]]
        and "ETA" not in lines[0]
        and lines[0].startswith("query chunk 00002: 10 queries")
    )


def test_embed_batches_reports_each_batch_to_progress():
    from copyscan.indexing.embed.decode import DecodedBatch
    from copyscan.indexing.embed.stage import embed_batches
    from copyscan.indexing.models.embedders import load_embedder

    embedder = load_embedder("effnet-lite0", None, "cpu", {"size": 64})
    pixels = np.zeros((3, 3, 64, 64), np.uint8)
    batches = [
        DecodedBatch(pixels[:2], [{"key": "a"}, {"key": "b"}], [{"key": "x", "reason": "truncated"}]),
        DecodedBatch(pixels[2:], [{"key": "c"}]),
    ]
    seen: list[int] = []
    out = embed_batches(batches, embedder, progress=seen.append)
    assert seen == [3, 1] and out.xb.shape[0] == 3
