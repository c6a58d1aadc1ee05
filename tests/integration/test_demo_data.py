"""jobs/demo/data.py on real components: img2dataset over loopback HTTP, loopback S3, real images."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.read.reader import iter_tar
from copyscan.indexing.store import storage
from copyscan.jobs.demo.data import (
    SOURCE_ID_COLUMN,
    file_sha256,
    make_generated_images,
    read_shard_stats,
    run_img2dataset,
    source_keys,
    write_url_list,
)

IMAGE_SIZE = 384  # run_img2dataset's default
SHARD_NAMES = ["00000", "00001", "00002", "00003"]


def _tar_members(data: bytes) -> dict[str, dict[str, bytes]]:
    """key → {extension: bytes} of a webdataset tar."""
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            members[key][ext] = tar.extractfile(info).read()
    return dict(members)


def _parquet_rows(folder: str) -> list[dict]:
    rows = []
    for name in SHARD_NAMES:
        rows += pq.read_table(f"{folder}/{name}.parquet").to_pylist()
    return rows


def test_img2dataset_writes_laion_format_shards(laion_shards):
    folder = laion_shards.folder
    assert laion_shards.shard_urls == [f"{folder}/{n}.tar" for n in SHARD_NAMES]
    assert sorted(p.name for p in Path(folder).iterdir()) == sorted(
        f"{n}{suffix}" for n in SHARD_NAMES for suffix in (".tar", ".parquet", "_stats.json")
    )
    served_of = {sid: laion_shards.served / sid for sid in laion_shards.source_id_of.values()}
    seen = {}
    for shard, url in enumerate(laion_shards.shard_urls):
        members = _tar_members(Path(url).read_bytes())
        parquet = {r["key"]: r for r in pq.read_table(f"{folder}/{SHARD_NAMES[shard]}.parquet").to_pylist()}
        for key, files in members.items():
            assert set(files) == {"jpg", "txt", "json"}, key
            # keys: 5-digit shard id, then the row within the shard (2 digits for 16 rows per shard)
            assert len(key) == 7 and key.startswith(SHARD_NAMES[shard])
            meta = json.loads(files["json"])
            assert meta["key"] == key and meta["status"] == "success" and meta["error_message"] is None
            assert files["txt"].decode() == meta["caption"] and meta["caption"].startswith("a painting of ")
            assert meta["url"] == f"{laion_shards.base_url}/{meta[SOURCE_ID_COLUMN].replace(' ', '%20')}"
            source = served_of[meta[SOURCE_ID_COLUMN]]
            assert meta["sha256"] == file_sha256(source)  # of the bytes served, before resizing
            with Image.open(io.BytesIO(files["jpg"])) as img:
                assert img.format == "JPEG" and img.size == (meta["width"], meta["height"])
            with Image.open(source) as original:
                assert original.size == (meta["original_width"], meta["original_height"])
            # keep_ratio, only if bigger: the short side comes down to 384, never up
            short = min(meta["original_width"], meta["original_height"])
            assert min(meta["width"], meta["height"]) == min(short, IMAGE_SIZE)
            assert parquet[key] == meta
            seen[meta[SOURCE_ID_COLUMN]] = key
    assert len(seen) == len(laion_shards.source_images) == 60
    assert {src: seen[sid] for src, sid in laion_shards.source_id_of.items()} == laion_shards.key_of_source
    assert source_keys(folder) == seen


def test_failed_downloads_are_recorded_by_img2dataset(laion_shards):
    stats = read_shard_stats(laion_shards.folder)
    assert sorted(stats) == SHARD_NAMES
    assert [s["count"] for s in stats.values()] == [16, 16, 16, 15]
    totals = Counter()
    messages = Counter()
    for s in stats.values():
        totals.update({k: s[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")})
        messages.update(s["status_dict"])
    assert totals == {"count": 63, "successes": 60, "failed_to_download": 1, "failed_to_resize": 2}
    assert messages == {"success": 60, "HTTP Error 404: File not found": 1, "Image decoding error": 2}
    rows = {r[SOURCE_ID_COLUMN]: r for r in _parquet_rows(laion_shards.folder)}
    assert len(rows) == 63
    tar_keys = set()
    for url in laion_shards.shard_urls:
        tar_keys |= set(_tar_members(Path(url).read_bytes()))
    for source_id, status in laion_shards.bad_rows.items():
        row = rows[source_id]
        assert row["status"] == status and row["error_message"]
        assert row["width"] is None and row["sha256"] is None
        assert row["key"] not in tar_keys  # a failed row is only in the parquet
    assert Counter(r["status"] for r in rows.values()) == {
        "success": 60,
        "failed_to_resize": 2,
        "failed_to_download": 1,
    }


def test_project_reader_reads_the_shards(laion_shards):
    samples = [s for url in laion_shards.shard_urls for s in iter_tar(url)]
    assert len(samples) == 60 and all(s.problem is None and s.image_format == "jpg" for s in samples)
    assert {s.meta[SOURCE_ID_COLUMN]: s.key for s in samples} == source_keys(laion_shards.folder)
    assert {s.key for s in samples} == set(laion_shards.key_of_source.values())
    assert all(s.caption == s.meta["caption"] and s.url == s.meta["url"] for s in samples)


def test_s3_shards_are_listable_and_readable(s3_server, laion_shards, laion_shards_s3):
    import s3fs

    so = s3_server.storage_options
    assert laion_shards_s3.pattern == f"s3://{laion_shards_s3.bucket}/shards/{{00000..00003}}.tar"
    listed = storage.list_files(laion_shards_s3.folder, so)
    assert [u for u in listed if u.endswith(".tar")] == laion_shards_s3.shard_urls
    assert len(listed) == 12
    # through the explicit options and through the environment alone (AWS_ENDPOINT_URL_S3)
    explicit = s3fs.S3FileSystem(**so)
    from_env = s3fs.S3FileSystem(skip_instance_cache=True)
    for local, remote in zip(laion_shards.shard_urls, laion_shards_s3.shard_urls, strict=True):
        path = remote.removeprefix("s3://")
        assert explicit.cat_file(path) == from_env.cat_file(path) == Path(local).read_bytes()
    remote_samples = {s.key: s.image for s in iter_tar(laion_shards_s3.shard_urls[1], so)}
    local_samples = {s.key: s.image for s in iter_tar(laion_shards.shard_urls[1])}
    assert remote_samples == local_samples and len(remote_samples) == 16


def test_run_img2dataset_raises_when_img2dataset_fails(tmp_path):
    url_list = str(tmp_path / "urls.parquet")
    pq.write_table(
        pa.table({"url": ["http://127.0.0.1:9/x.jpg"], "caption": ["x"], "source_id": ["x"]}), url_list
    )
    # An option img2dataset rejects before starting any process: the cheapest failing run (one import).
    with pytest.raises(CopyscanError, match=r"img2dataset into .* failed \(exit status 1\)") as err:
        run_img2dataset(url_list, str(tmp_path / "out"), extra_options={"compute_hash": "crc32"})
    assert "Unsupported hash to compute: crc32" in str(err.value)  # the child's output, captured
    assert "shards without _stats.json: ['00000']" in str(err.value)
    with pytest.raises(CopyscanError, match=r"failed \(killed after 0.5 s\)"):
        run_img2dataset(url_list, str(tmp_path / "out"), timeout_s=0.5)
    with pytest.raises(CopyscanError, match="one parquet file"):
        run_img2dataset(str(tmp_path), str(tmp_path / "out"))


@pytest.mark.slow
def test_img2dataset_writes_to_s3_and_resumes(s3_server, laion_shards):
    """img2dataset straight into moto (endpoint from AWS_ENDPOINT_URL_S3), resuming an interrupted run.

    The "interrupted run" left shard 0 complete (its _stats.json written) and shard 1 absent; the rerun
    must download shard 1 only and leave shard 0's objects alone.
    """
    so = s3_server.storage_options
    bucket = s3_server.make_bucket("direct")
    staged = [laion_shards.served / sid for sid in list(laion_shards.source_id_of.values())[:10]]
    url_list = write_url_list(
        staged, laion_shards.base_url, f"s3://{bucket}/meta/urls.parquet", root=laion_shards.served
    )
    folder = f"s3://{bucket}/shards"
    earlier = {
        "00000.tar": b"shard 0 from the earlier run",
        "00000.parquet": b"earlier",
        "00000_stats.json": b"{}",
    }
    for name, data in earlier.items():
        storage.write_bytes(f"{folder}/{name}", data, so)

    shards = run_img2dataset(url_list, folder, number_sample_per_shard=5)

    assert shards == [f"{folder}/00000.tar", f"{folder}/00001.tar"]
    names = [u.rsplit("/", 1)[1] for u in storage.list_files(folder, so)]
    assert names == sorted(f"0000{i}{s}" for i in range(2) for s in (".parquet", ".tar", "_stats.json"))
    assert {name: storage.read_bytes(f"{folder}/{name}", so) for name in earlier} == earlier
    members = _tar_members(storage.read_bytes(shards[1], so))
    # 5 rows per shard: keys are the shard id and a 1-digit row, 000010 .. 000014 for rows 5 .. 9
    assert sorted(members) == [f"00001{i}" for i in range(5)]
    assert all(set(files) == {"jpg", "txt", "json"} for files in members.values())
    downloaded = {json.loads(files["json"])[SOURCE_ID_COLUMN] for files in members.values()}
    assert downloaded == {p.relative_to(laion_shards.served).as_posix() for p in staged[5:]}
    assert read_shard_stats(folder)["00001"]["successes"] == 5
    assert (
        pq.read_table(f"{bucket}/shards/00001.parquet", filesystem=storage.get_fs(folder, so)[0]).num_rows
        == 5
    )


def test_generated_images_and_ground_truth(laion_shards, real_images, tmp_path):
    train = laion_shards.source_images
    others = [p for p in real_images if p not in set(train)]
    truth = make_generated_images(train, others, str(tmp_path / "a"), n_copies=6, n_unrelated=5, seed=11)
    assert [t["query_id"] for t in truth] == [f"gen_{i:05d}" for i in range(11)]
    assert json.loads((tmp_path / "a" / "ground_truth.json").read_text()) == truth
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        [t["file"] for t in truth] + ["ground_truth.json"]
    )
    copies = [t for t in truth if t["is_copy"]]
    assert len(copies) == 6 and all(t["source_image"] is None for t in truth if not t["is_copy"])
    sources = [Path(t["source_image"]) for t in copies]
    assert len(set(sources)) == 6 and all(s in laion_shards.key_of_source for s in sources)
    # copies and unrelated images are mixed, not in two blocks
    assert [t["is_copy"] for t in truth] != sorted((t["is_copy"] for t in truth), reverse=True)
    for t in truth:
        with Image.open(tmp_path / "a" / t["file"]) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and min(img.size) >= 32

    again = make_generated_images(train, others, str(tmp_path / "b"), n_copies=6, n_unrelated=5, seed=11)
    assert again == truth
    for t in truth:
        assert (tmp_path / "a" / t["file"]).read_bytes() == (tmp_path / "b" / t["file"]).read_bytes()
    other_seed = make_generated_images(train, others, str(tmp_path / "c"), n_copies=6, n_unrelated=5, seed=12)
    assert [t["source_image"] for t in other_seed] != [t["source_image"] for t in truth]

    with pytest.raises(CopyscanError, match="are training images"):
        make_generated_images(train, train[:3], str(tmp_path / "d"), n_copies=1, n_unrelated=1, seed=0)
    with pytest.raises(CopyscanError, match="asked for 61 copies"):
        make_generated_images(train, others, str(tmp_path / "d"), n_copies=61, n_unrelated=1, seed=0)


def test_generated_copies_resemble_their_sources(laion_shards, real_images, tmp_path):
    """A planted copy is closer (tiny grey thumbnails) to its source than to most training images."""
    train = laion_shards.source_images
    others = [p for p in real_images if p not in set(train)]
    truth = make_generated_images(train, others, str(tmp_path), n_copies=5, n_unrelated=0, seed=1)

    def thumb(path) -> np.ndarray:
        from copyscan.indexing.read.images import open_rgb

        x = np.asarray(open_rgb(path).convert("L").resize((16, 16)), dtype=np.float32).ravel()
        return (x - x.mean()) / (x.std() + 1e-6)

    xb = np.stack([thumb(p) for p in train])
    for t in truth:
        scores = xb @ thumb(tmp_path / t["file"])
        rank = int((scores > scores[train.index(Path(t["source_image"]))]).sum())
        assert rank < len(train) // 4, (t, rank)
