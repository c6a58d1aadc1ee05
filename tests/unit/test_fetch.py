"""Re-fetching images by key: one read per source, every request answered."""

import io
import json
import time

import numpy as np
from PIL import Image
from test_decode import _tar

from copyscan.indexing.read import fetch
from copyscan.indexing.read.reader import iter_tar


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_fetch_by_key_from_tars_and_files(tmp_path):
    images = {f"{i:09d}": _jpeg(i) for i in range(6)}
    members = []
    for key, data in images.items():
        members += [(f"{key}.jpg", data), (f"{key}.txt", b"caption")]
    members.append(("000000099.txt", b"a sample without an image"))
    shard = str(tmp_path / "00000.tar")
    _tar(shard, members)
    loose = tmp_path / "gen.png"
    loose.write_bytes(images["000000001"])

    requests = [
        (shard, "000000002"),
        (shard, "000000005"),
        (shard, "000000002"),  # duplicates collapse
        (shard, "nope"),
        (shard, "000000099"),
        (str(loose), "gen.png"),
        (str(tmp_path / "missing.tar"), "000000000"),
        (None, "imported"),
    ]
    got = fetch.fetch_images(requests)
    assert len(got) == 7
    assert got[(shard, "000000002")].data == images["000000002"]
    assert got[(shard, "000000005")].image_format == "jpg"
    assert got[(shard, "nope")].reason == fetch.KEY_NOT_FOUND
    assert got[(shard, "000000099")].reason == fetch.NO_IMAGE
    assert got[(str(loose), "gen.png")].data == images["000000001"]
    assert got[(str(tmp_path / "missing.tar"), "000000000")].reason == fetch.SOURCE_UNREADABLE
    assert got[(None, "imported")].reason == fetch.NO_SOURCE


def test_training_source_from_manifest():
    manifest = {"embedding_shards": [{"source": "s3://b/00000.tar"}, {"source": "img_emb/img_emb_0.npy"}]}
    assert fetch.training_source(manifest, "x", 0) == "s3://b/00000.tar"
    assert fetch.training_source(manifest, "x", 1) is None
    try:
        fetch.training_source(manifest, "x", 2)
    except fetch.CopyscanError as exc:
        assert "embedding shard 2" in str(exc)
    else:
        raise AssertionError("out-of-range shard accepted")


class _Server:
    """A loopback HTTP server that counts requests and answers each after ``delay`` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.hits: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits.append(self.path)
                time.sleep(delay)
                body = _jpeg(7)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_urls_in_a_samples_metadata_are_never_fetched(tmp_path):
    """A sample's ``url`` (an http URL, a file:// URL) is metadata: reading and re-fetching the sample reads
    the tar, and no request reaches the URL."""
    server = _Server()
    try:
        shard = str(tmp_path / "00000.tar")
        meta = {"000000000": f"{server.url}/a.jpg", "000000001": "file:///etc/passwd"}
        members = []
        for key, url in meta.items():
            members += [(f"{key}.jpg", _jpeg(int(key))), (f"{key}.json", json.dumps({"url": url}).encode())]
        _tar(shard, members)
        assert {s.key: s.url for s in iter_tar(shard)} == meta
        got = fetch.fetch_images([(shard, key) for key in meta])
        assert [got[(shard, key)].data for key in meta] == [_jpeg(0), _jpeg(1)]
        assert server.hits == []
    finally:
        server.close()


def test_sources_of_other_protocols_are_never_opened(tmp_path):
    import fsspec

    fsspec.filesystem("memory").pipe("/planted.jpg", _jpeg(3))
    requests = [
        ("memory://planted.jpg", "a"),
        ("data:image/jpeg;base64,AAAA", "b"),
        ("ftp://127.0.0.1:9/x.jpg", "c"),
        ("simplecache::file:///etc/hostname", "d"),
    ]
    got = fetch.fetch_images(requests)
    assert {k: f.reason for (_, k), f in got.items()} == dict.fromkeys("abcd", fetch.SOURCE_NOT_ALLOWED)
    assert all(f.data is None for f in got.values())


def test_sources_get_a_size_and_a_time_limit(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    big.write_bytes(_jpeg(4))
    monkeypatch.setattr(fetch, "MAX_SOURCE_BYTES", 100)
    got = fetch.fetch_images([(str(big), "big")])[(str(big), "big")]
    assert got.reason == fetch.SOURCE_TOO_LARGE and got.data is None
    server = _Server(delay=5.0)
    try:
        t0 = time.monotonic()
        got = fetch.fetch_images([(f"{server.url}/slow.jpg", "slow")], timeout=0.5)
        assert got[(f"{server.url}/slow.jpg", "slow")].reason == fetch.SOURCE_TIMED_OUT == "source_timeout"
        assert time.monotonic() - t0 < 3.0
    finally:
        server.close()
