"""Training images read back by their place in the tar: offsets recorded while reading, one ranged read each."""

import io
import tarfile

import numpy as np
from PIL import Image
from test_decode import _tar

from copyscan.indexing.embed.decode import decode_samples
from copyscan.indexing.models.preprocess import make_preprocess
from copyscan.indexing.read import fetch, ranged
from copyscan.indexing.read.reader import iter_tar


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _shard(path, n=8, seed=0):
    images = {f"{i:09d}": _jpeg(seed + i) for i in range(n)}
    members = []
    for key, data in images.items():
        members += [(f"{key}.txt", b"a caption"), (f"{key}.jpg", data), (f"{key}.json", b"{}")]
    _tar(str(path), members)
    return images


def test_reader_and_decode_record_where_each_image_lies(tmp_path):
    shard = tmp_path / "00000.tar"
    images = _shard(shard)
    raw = shard.read_bytes()
    samples = list(iter_tar(str(shard)))
    assert [s.key for s in samples] == list(images)
    for s in samples:
        assert raw[s.image_offset : s.image_offset + len(s.image)] == images[s.key]
    preprocess = make_preprocess({"kind": "squash", "size": 32})
    records = [
        r for b in decode_samples(iter_tar(str(shard)), preprocess, 4, image_size=32) for r in b.records
    ]
    assert [(r["tar_offset"], r["tar_size"]) for r in records] == [
        (s.image_offset, len(s.image)) for s in samples
    ]


def test_compressed_tars_record_no_offsets(tmp_path):
    path = tmp_path / "00000.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        data = _jpeg(1)
        info = tarfile.TarInfo("000000001.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (sample,) = iter_tar(str(path))
    assert sample.image is not None and sample.image_offset is None


def test_ranged_reads_return_the_images_and_refuse_a_rewritten_tar(tmp_path):
    shard = tmp_path / "00000.tar"
    images = _shard(shard)
    where = {s.key: (s.image_offset, len(s.image)) for s in iter_tar(str(shard))}
    got = ranged.read_ranges(str(shard), where)
    assert {k: v[0] for k, v in got.items()} == images
    assert {v[1] for v in got.values()} == {"jpg"}

    # The tar is rewritten (other images, other order): the recorded places no longer hold those keys.
    keys = list(images)
    swapped = {keys[0]: where[keys[1]], keys[1]: where[keys[0]], keys[2]: (where[keys[2]][0] + 512, 10)}
    assert ranged.read_ranges(str(shard), swapped) == {}

    # fetch_images uses the ranges it can and streams the tar for the rest: every answer is still right
    requests = [(str(shard), k) for k in keys[:4]]
    ranges = {(str(shard), k): v for k, v in swapped.items()} | {(str(shard), keys[3]): where[keys[3]]}
    fetched = fetch.fetch_images(requests, ranges=ranges)
    assert {req[1]: f.data for req, f in fetched.items()} == {k: images[k] for k in keys[:4]}


def test_member_name_reads_ustar_headers():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("part/" * 30 + "000000001.jpg")  # > 100 bytes: split into prefix and name
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    header = buf.getvalue()[:512]
    assert ranged.member_name(header) == "part/" * 30 + "000000001.jpg"
    assert ranged.member_name(b"\0" * 512) is None
    assert ranged.member_name(b"x" * 100) is None
