"""Hostile and odd input: tar members that try to leave the shard, links, duplicate keys, broken metadata,
truncated tars, decoders that never end, and arbitrary bytes and strings (hypothesis)."""

from __future__ import annotations

import io
import tarfile
import time

import numpy as np
import pytest
from hostile_tars import add_member as _add
from hostile_tars import hostile_shard
from hostile_tars import png as _png
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from copyscan.indexing.embed.decode import DecodeLimits, Rejected, decode_image, decode_samples
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.read.reader import iter_tar
from copyscan.indexing.runtime.config import parse_overrides, resolve
from copyscan.indexing.runtime.deadline import DeadlineExceeded, time_limit
from copyscan.search.scan_config import ScanConfig


def _squash(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB").resize((16, 16)), dtype=np.uint8).transpose(2, 0, 1).copy()


def _outcomes(url: str) -> dict[str, str]:
    """key → "ok" or the rejection reason, over every sample of the shard (a key may come twice)."""
    out: list[tuple[str, str]] = []
    for batch in decode_samples(iter_tar(url), _squash, 4, DecodeLimits(min_side=8), image_size=16):
        out += [(r["key"], "ok") for r in batch.records]
        out += [(r["key"], r["reason"]) for r in batch.rejections]
    return out


def test_hostile_members_are_rejected_with_their_reason(tmp_path):
    url = str(tmp_path / "00000.tar")
    hostile_shard(url)
    got = _outcomes(url)
    assert sorted(got) == sorted(
        [
            ("good0", "ok"),
            ("../../escape", "unsafe_name"),
            ("/etc/absolute", "unsafe_name"),
            ("sub/../../up", "unsafe_name"),
            ("link", "not_a_regular_file"),
            ("hard", "not_a_regular_file"),
            ("fifo", "not_a_regular_file"),
            ("good0", "duplicate_key"),
            ("onlytext", "missing_image"),
            ("nojson", "ok"),
            ("latin1", "ok"),
            ("twice", "ok"),
            ("twice", "duplicate_key"),
            ("NOEXTENSION", "no_extension"),
            ("ctrl\x01name", "unsafe_name"),
        ]
    )
    samples = {s.key: s for s in iter_tar(url)}
    assert (
        samples["latin1"].caption == "caf\ufffd cr\ufffdme"
        and samples["latin1"].problem == "bad_metadata_json"
    )
    assert samples["nojson"].meta == {} and samples["nojson"].problem is None
    assert "members: txt" in samples["onlytext"].problem


def test_a_tar_that_ends_mid_member_fails_the_shard_after_its_whole_samples(tmp_path):
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tar:
        for i in range(3):
            _add(tar, f"{i:05d}.png", _png(i, size=64))
    data = whole.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) * 2 // 3])  # inside the third member
    seen = []
    with pytest.raises(CopyscanError, match=r"cut.tar is corrupt or truncated"):
        for sample in iter_tar(str(cut)):
            seen.append(sample.key)
    # whole samples before the cut come out (a sample is complete when the next one starts), then the error
    assert seen == ["00000"]


def test_the_decode_time_limit_stops_a_slow_decode():
    buf = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buf, "PNG")  # 64 M pixels, 60 KB: legal, slow to inflate
    started = time.perf_counter()
    with pytest.raises(Rejected) as info:
        decode_image(buf.getvalue(), DecodeLimits(max_pixels=64_000_000, max_seconds=0.01))
    assert info.value.reason == "decode_timeout" and time.perf_counter() - started < 2


def test_time_limit_restores_an_outer_timer():
    import signal

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(DeadlineExceeded), time_limit(0.05):
            time.sleep(1)
        time.sleep(0.5)
        assert fired == [1]  # the outer timer fired after the block, once
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_eps_is_refused_without_running_ghostscript():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(Rejected) as info:
        decode_image(eps, DecodeLimits())
    assert info.value.reason == "unsupported_format"
    with pytest.raises(Rejected) as info:
        decode_image(b"", DecodeLimits())
    assert info.value.reason == "empty_file"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=4096),
        # a real tar cut or corrupted somewhere: the reader gets past the header parsing
        st.tuples(st.integers(0, 3071), st.integers(0, 255), st.booleans()).map(lambda t: _mangled(*t)),
    )
)
def test_the_reader_on_arbitrary_bytes_raises_only_copyscan_error(tmp_path, data):
    url = tmp_path / "x.tar"
    url.write_bytes(data)
    try:
        for batch in decode_samples(iter_tar(str(url)), _squash, 4, DecodeLimits(min_side=1), image_size=16):
            assert len(batch.records) + len(batch.rejections) >= 0
    except CopyscanError:
        pass


_BASE_TAR: bytes | None = None


def _mangled(position: int, value: int, cut: bool) -> bytes:
    global _BASE_TAR
    if _BASE_TAR is None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            _add(tar, "a.png", _png(0, size=8))
            _add(tar, "a.json", b'{"url": "u"}')
            _add(tar, "b.txt", b"t")
        _BASE_TAR = buf.getvalue()
    data = bytearray(_BASE_TAR)
    position %= len(data)
    if cut:
        return bytes(data[:position])
    data[position] = value
    return bytes(data)


@settings(max_examples=80, deadline=None)
@given(items=st.lists(st.text(max_size=40), max_size=6))
def test_the_config_parser_on_arbitrary_strings_raises_only_copyscan_error(items):
    try:
        overrides = parse_overrides(items)
        resolve(ScanConfig, {"index": "/i", "queries": "/q", "out": "/o"}, overrides)
    except CopyscanError:
        pass


@settings(max_examples=150, deadline=None)
@given(
    key=st.sampled_from(
        ["k", "chunk_size", "threshold", "storage_options", "nprobe", "mode", "verify_pixels"]
    ),
    value=st.text(max_size=30),
)
def test_every_known_key_with_an_arbitrary_value_raises_only_copyscan_error(key, value):
    try:
        resolve(
            ScanConfig, {"index": "/i", "queries": "/q", "out": "/o"}, parse_overrides([f"{key}={value}"])
        )
    except CopyscanError:
        pass
