"""Bad images are rejected with a reason, never raised, never dropped."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from copyscan.indexing.embed.decode import DecodeLimits, PairSpec, decode_samples
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.read.reader import Sample, iter_tar


def _jpeg(w=64, h=48, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _squash(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB").resize((16, 16)), dtype=np.uint8).transpose(2, 0, 1).copy()


def test_each_bad_image_gets_its_reason():
    good = _jpeg()
    samples = [
        Sample("ok1", good, "jpg", caption="a", url="http://x/1"),
        Sample("trunc", good[: len(good) // 2], "jpg"),
        Sample("text", b"this is not an image", "jpg"),
        Sample("big", _jpeg(200, 200), "jpg"),
        Sample("tiny", _jpeg(4, 4), "jpg"),
        Sample("noimg", None, None),
        Sample("unreadable", None, "jpg", problem="unreadable_file: permission denied"),
        Sample("badjson", good, "jpg", problem="bad_metadata_json"),
        Sample("ok2", _jpeg(seed=1), "jpg"),
    ]
    limits = DecodeLimits(max_pixels=150 * 150, min_side=8)
    batches = list(decode_samples(samples, _squash, batch_size=2, limits=limits, image_size=16))
    records = [r for b in batches for r in b.records]
    rejections = {r["key"]: r["reason"] for b in batches for r in b.rejections}
    assert [r["key"] for r in records] == ["ok1", "badjson", "ok2"]
    assert records[1]["metadata_error"] == "bad_metadata_json"
    assert rejections == {
        "trunc": "truncated",
        "text": "not_an_image",
        "big": "too_large",
        "tiny": "too_small",
        "noimg": "missing_image",
        "unreadable": "unreadable_file",
    }
    assert sum(len(b.pixels) for b in batches) == 3
    assert all(b.pixels.shape[1:] == (3, 16, 16) and b.pixels.dtype == np.uint8 for b in batches)
    assert len(records) + len(rejections) == len(samples)


def test_rejections_after_the_last_image_are_kept():
    batches = list(decode_samples([Sample("a", b"junk", "jpg")], _squash, batch_size=4, image_size=16))
    assert len(batches) == 1 and batches[0].pixels.shape == (0, 3, 16, 16)
    assert batches[0].rejections[0]["reason"] == "not_an_image"


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_reader_groups_members(tmp_path):
    path = tmp_path / "00000.tar"
    _tar(
        path,
        [
            ("000000001.jpg", _jpeg()),
            ("000000001.txt", b"a cat"),
            ("000000001.json", b'{"url": "http://a", "key": "1"}'),
            ("000000002.png", b"png?"),
            ("000000002.json", b"{broken"),
            ("000000003.txt", b"caption only"),
        ],
    )
    samples = list(iter_tar(str(path)))
    assert [s.key for s in samples] == ["000000001", "000000002", "000000003"]
    assert samples[0].caption == "a cat" and samples[0].url == "http://a" and samples[0].image_format == "jpg"
    assert samples[1].problem == "bad_metadata_json" and samples[1].image == b"png?"
    assert samples[2].image is None


def test_truncated_tar_is_a_clear_shard_error(tmp_path):
    path = tmp_path / "00000.tar"
    _tar(path, [(f"{i:09d}.jpg", _jpeg(seed=i)) for i in range(3)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(CopyscanError, match="corrupt or truncated"):
        list(iter_tar(str(path)))


def test_pairs_are_augmented_copies_of_the_first_accepted_images():
    samples = [Sample("bad", b"junk", "jpg")] + [Sample(f"ok{i}", _jpeg(seed=i), "jpg") for i in range(5)]
    spec = PairSpec(images=3, copies=2, seed=7, shard=4)
    batches = list(decode_samples(samples, _squash, batch_size=2, image_size=16, pairs=spec))
    rows = np.concatenate([b.pair_rows for b in batches if b.pair_rows is not None])
    pixels = np.concatenate([b.pair_pixels for b in batches if b.pair_pixels is not None])
    # rows index the accepted images (the rejected first sample does not count), two copies each
    assert rows.tolist() == [0, 0, 1, 1, 2, 2]
    assert pixels.shape == (6, 3, 16, 16) and pixels.dtype == np.uint8
    originals = np.concatenate([b.pixels for b in batches])
    assert len(originals) == 5
    # copies differ from their image and from each other, and are reproducible from the seed
    assert not np.array_equal(pixels[0], originals[0]) and not np.array_equal(pixels[0], pixels[1])
    again = list(decode_samples(samples, _squash, batch_size=2, image_size=16, pairs=spec))
    np.testing.assert_array_equal(
        np.concatenate([b.pair_pixels for b in again if b.pair_pixels is not None]), pixels
    )
    assert all(b.pair_pixels is None for b in decode_samples(samples, _squash, 2, image_size=16))


def test_a_failed_augmentation_is_noted_and_the_image_still_indexed():
    calls = []

    def fussy(
        img,
    ):  # fails on the augmented copies (JPEG-decoded, so mode RGB of another size), not the original
        calls.append(img.size)
        if len(calls) > 1:
            raise ValueError("cannot handle this")
        return _squash(img)

    batches = list(
        decode_samples([Sample("a", _jpeg(), "jpg")], fussy, 4, image_size=16, pairs=PairSpec(images=1))
    )
    assert [r["key"] for b in batches for r in b.records] == ["a"]
    assert all(b.pair_pixels is None for b in batches)
    assert [e["key"] for b in batches for e in b.pair_errors] == ["a"]
    assert "cannot handle this" in batches[0].pair_errors[0]["detail"]


def test_provenance_columns_come_from_the_sample_json():
    from copyscan.indexing.embed.provenance import provenance
    from copyscan.indexing.embed.stage import METADATA_SCHEMA, metadata_table

    meta = {"LICENSE": "cc-by-4.0", "pwatermark": 0.91, "punsafe": "0.02", "similarity": 0.33, "sha256": "ab"}
    assert provenance(meta) == {
        "license": "cc-by-4.0",
        "pwatermark": 0.91,
        "punsafe": 0.02,
        "clip_similarity": 0.33,
    }
    # absent, NaN, not a number, a bool: None, never an error
    assert provenance({"pwatermark": float("nan"), "punsafe": "high", "similarity": True}) == {
        "license": None,
        "pwatermark": None,
        "punsafe": None,
        "clip_similarity": None,
    }
    assert provenance({"license": 3, "clip_similarity": 1})["license"] == "3"
    batch = next(
        decode_samples([Sample("k", _jpeg(), "jpg", meta=meta)], _squash, batch_size=2, image_size=16)
    )
    table = metadata_table(batch.records)
    assert table.schema.equals(METADATA_SCHEMA)
    row = table.to_pylist()[0]
    assert (row["sha256"], row["license"], row["clip_similarity"]) == ("ab", "cc-by-4.0", pytest.approx(0.33))


def test_metadata_of_an_index_without_provenance_reads_as_none(tmp_path):
    """Indexes built before the provenance columns: their matches carry nulls there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from copyscan.search.ann.searcher import describe_row, load_metadata

    path = str(tmp_path / "metadata_00000.parquet")
    pq.write_table(pa.table({"row": [0], "key": ["k0"], "url": ["http://x/0"], "caption": ["c"]}), path)
    columns = load_metadata(path, str(tmp_path / "cache" / "m.parquet"), None)
    assert describe_row(columns, 0) == {
        "train_key": "k0",
        "train_url": "http://x/0",
        "caption": "c",
        "sha256": None,
        "license": None,
        "pwatermark": None,
        "punsafe": None,
        "clip_similarity": None,
    }


def test_draft_decodes_large_jpegs_reduced_and_keeps_their_size_on_file():
    """``draft``: a 640 × 512 JPEG is decoded at 1/2 scale (both sides still ≥ 224), its record keeps the
    size on file, and its model input differs from a full decode by resampling noise only; a PNG and a JPEG
    too small to reduce are decoded as before."""
    from copyscan.indexing.models.preprocess import make_preprocess

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (16, 20, 3)), np.ones((32, 32, 1))).astype(np.uint8)  # 512 × 640
    big = _encode(Image.fromarray(smooth), "JPEG")
    small = _encode(Image.fromarray(smooth).resize((320, 256)), "JPEG")
    png = _encode(Image.fromarray(smooth), "PNG")
    preprocess = make_preprocess({"kind": "squash", "size": 224})
    samples = [Sample(key, data, "jpg") for key, data in (("big", big), ("small", small), ("png", png))]
    full = next(decode_samples(samples, preprocess, 8))
    reduced = next(decode_samples(samples, preprocess, 8, draft=224))
    assert [(r["width"], r["height"]) for r in reduced.records] == [(640, 512), (320, 256), (640, 512)]
    assert reduced.records == full.records
    diff = np.abs(reduced.pixels.astype(np.int16) - full.pixels.astype(np.int16))
    assert 0 < diff[0].mean() < 3  # reduced, and close
    assert diff[1:].max() == 0  # not reducible / not a JPEG: the same pixels
    with pytest.raises(ValueError, match="draft"):
        next(decode_samples(samples, preprocess, 8, pairs=PairSpec(images=1), draft=224))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()
