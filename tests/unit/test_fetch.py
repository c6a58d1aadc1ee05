"""Re-fetching images by key: one read per source, every request answered."""

import io

import numpy as np
from PIL import Image
from test_decode import _tar

from copyscan.indexing.read import fetch


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
