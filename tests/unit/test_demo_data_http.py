"""The loopback HTTP server and the LAION-style url list of jobs/demo/data.py (fast, no Ray, no img2dataset)."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest

from copyscan.indexing.errors import CopyscanError
from copyscan.jobs.demo.data import caption_for, serve_directory, stage_images, write_url_list


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def test_serves_files_and_404s_on_loopback(tmp_path, capfd):
    (tmp_path / "sub dir").mkdir()
    (tmp_path / "sub dir" / "a b.jpg").write_bytes(b"\xff\xd8 bytes")
    (tmp_path / "x.txt").write_text("hello")
    with serve_directory(tmp_path) as base:
        assert base.startswith("http://127.0.0.1:") and not base.endswith("/")
        assert int(base.rsplit(":", 1)[1]) > 0
        assert _get(f"{base}/x.txt") == b"hello"
        assert _get(f"{base}/sub%20dir/a%20b.jpg") == b"\xff\xd8 bytes"
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(f"{base}/missing.jpg")
        assert err.value.code == 404
        # concurrent clients, as img2dataset's thread pool is
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(lambda _: _get(f"{base}/x.txt"), range(32))) == {b"hello"}
    out, errors = capfd.readouterr()
    assert out == "" and errors == "", "the server must not log requests"


def test_shuts_down_on_exit(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    threads_before = set(threading.enumerate())
    with serve_directory(tmp_path) as base:
        _get(f"{base}/x.txt")
    with pytest.raises(urllib.error.URLError):
        _get(f"{base}/x.txt")
    assert not [t for t in set(threading.enumerate()) - threads_before if t.name.startswith("http-")]


def test_shuts_down_when_the_body_raises(tmp_path):
    with pytest.raises(RuntimeError), serve_directory(tmp_path) as base:
        raise RuntimeError("boom")
    with pytest.raises(urllib.error.URLError):
        _get(f"{base}/")


def test_refuses_a_missing_folder(tmp_path):
    with pytest.raises(CopyscanError, match="not a directory"), serve_directory(tmp_path / "nope"):
        pass


def test_captions_are_derived_from_the_file_name():
    assert caption_for("/x/00007_konrad-elvish-glad.png") == "a painting of konrad elvish glad"
    assert caption_for("Li'sar_2.JPG") == "a painting of li sar"
    assert caption_for("0001.png") == "a painting of something"


def test_url_list_is_a_laion_style_parquet(tmp_path):
    sources = []
    for i, name in enumerate(["konrad.png", "story.jpg"]):
        folder = tmp_path / "pkg" / f"campaign{i}"
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"x" * (i + 1))
        sources.append(folder / name)
    staged = stage_images(sources, tmp_path / "served" / "train")
    assert [p.name for p in staged] == ["00000_konrad.png", "00001_story.jpg"]
    assert [p.read_bytes() for p in staged] == [b"x", b"xx"]
    rows = [*staged, tmp_path / "served" / "bad" / "gone 1.jpg"]
    out = write_url_list(
        rows, "http://127.0.0.1:8000/", str(tmp_path / "urls.parquet"), root=tmp_path / "served"
    )
    table = pq.read_table(out)
    assert table.column_names == ["url", "caption", "source_id"]
    assert table.to_pylist() == [
        {
            "url": "http://127.0.0.1:8000/train/00000_konrad.png",
            "caption": "a painting of konrad",
            "source_id": "train/00000_konrad.png",
        },
        {
            "url": "http://127.0.0.1:8000/train/00001_story.jpg",
            "caption": "a painting of story",
            "source_id": "train/00001_story.jpg",
        },
        {
            "url": "http://127.0.0.1:8000/bad/gone%201.jpg",
            "caption": "a painting of gone",
            "source_id": "bad/gone 1.jpg",
        },
    ]
    # explicit captions; root defaults to the images' common folder
    write_url_list(staged, "http://h:1", str(tmp_path / "u2.parquet"), ["one", "two"])
    assert pq.read_table(tmp_path / "u2.parquet").to_pydict() == {
        "url": ["http://h:1/00000_konrad.png", "http://h:1/00001_story.jpg"],
        "caption": ["one", "two"],
        "source_id": ["00000_konrad.png", "00001_story.jpg"],
    }


def test_url_list_rejects_inconsistent_input(tmp_path):
    image = tmp_path / "a.png"
    with pytest.raises(CopyscanError, match="2 captions"):
        write_url_list([image], "http://h:1", str(tmp_path / "u.parquet"), ["a", "b"])
    with pytest.raises(CopyscanError, match="not under the served root"):
        write_url_list([image], "http://h:1", str(tmp_path / "u.parquet"), root=tmp_path / "other")
    with pytest.raises(CopyscanError, match="twice"):
        write_url_list([image, image], "http://h:1", str(tmp_path / "u.parquet"))
    with pytest.raises(CopyscanError, match="no images"):
        write_url_list([], "http://h:1", str(tmp_path / "u.parquet"))
