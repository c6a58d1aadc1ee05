"""Every file of Pillow's own test-image corpus through copyscan's read and decode path.

Pillow's source distribution keeps the images its tests open (``Tests/images/``): every format it reads,
16-bit, CMYK, palette, alpha, animated, EXIF-rotated files, decompression bombs, and the files oss-fuzz
found to crash or hang a decoder. The sdist of the installed Pillow is fetched once with ``pip download``
into ``$COPYSCAN_CACHE/pillow`` (default ``~/.cache/copyscan/pillow``) and reused; a zero-byte file and a
truncated JPEG, which the corpus lacks, are added.
"""

from __future__ import annotations

import collections
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import PIL.Image
import pytest

from copyscan.indexing.embed.decode import DecodeLimits, decode_samples
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.embedders import load_embedder
from copyscan.indexing.read.reader import iter_tar

IMAGES_FOLDER = "/Tests/images/"


def _pillow_sdist() -> Path:
    """Pillow's sdist for the installed version, downloaded once into the cache."""
    version = PIL.__version__
    cache = Path(os.environ.get("COPYSCAN_CACHE", os.path.expanduser("~/.cache/copyscan"))) / "pillow"
    sdist = cache / f"pillow-{version}.tar.gz"
    if sdist.exists():
        return sdist
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
            + ["--disable-pip-version-check", "-q", f"pillow=={version}", "-d", tmp],
            check=True,
            timeout=900,
        )
        (downloaded,) = Path(tmp).glob("*.tar.gz")
        os.replace(downloaded, sdist)  # renamed when complete: an interrupted download is redone
    return sdist


@pytest.fixture(scope="module")
def pillow_corpus() -> dict[str, bytes]:
    """name (relative to Tests/images/) → bytes, for every regular file of the folder, plus the additions."""
    files: dict[str, bytes] = {}
    with tarfile.open(_pillow_sdist()) as tar:
        for info in tar:
            if info.isfile() and IMAGES_FOLDER in info.name:
                files[info.name.split(IMAGES_FOLDER, 1)[1]] = tar.extractfile(info).read()
    assert len(files) > 1000, "Pillow's sdist holds no Tests/images/ folder any more"
    files["copyscan-added/zero-byte.png"] = b""
    files["copyscan-added/truncated.jpg"] = files["hopper.jpg"][: len(files["hopper.jpg"]) // 2]
    return dict(sorted(files.items()))


def _shards(corpus: dict[str, bytes], folder: Path, per_shard: int) -> list[str]:
    """The corpus as img2dataset shards: ``{key}.jpg`` (the file's bytes, whatever their format: the content
    decides), ``.txt`` (its name) and ``.json``."""
    folder.mkdir(parents=True)
    urls = []
    names = list(corpus)
    for shard, start in enumerate(range(0, len(names), per_shard)):
        url = folder / f"{shard:05d}.tar"
        with tarfile.open(url, "w") as tar:
            for i, name in enumerate(names[start : start + per_shard], start):
                key = f"{shard:05d}{i:04d}"
                meta = json.dumps({"url": f"file-of-pillow/{name}", "key": key}).encode()
                for ext, blob in (("jpg", corpus[name]), ("txt", name.encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
        urls.append(str(url))
    return urls


@pytest.mark.slow
def test_every_file_of_pillows_corpus_is_accepted_or_rejected_with_a_reason(pillow_corpus, tmp_path):
    """Read from shards and decoded one image at a time: counts add up to the shards' samples, no exception
    escapes, no image takes longer than the product's own limit (plus scheduling slack)."""
    urls = _shards(pillow_corpus, tmp_path / "shards", per_shard=300)
    preprocess = load_embedder("effnet-lite0", None, "cpu", {}).preprocess
    # 2 s: the few files Pillow decodes slowly in pure Python (an uncompressed DDS, a large JPEG 2000) meet
    # the limit, which keeps the test short
    limits = DecodeLimits(max_pixels=64_000_000, min_side=8, max_seconds=2.0)
    accepted: list[str] = []
    rejected: dict[str, str] = {}
    slowest = 0.0
    for url in urls:
        for sample in iter_tar(url):
            started = time.perf_counter()
            (batch,) = decode_samples([sample], preprocess, 1, limits, image_size=224)
            slowest = max(slowest, time.perf_counter() - started)
            assert len(batch.records) + len(batch.rejections) == 1
            if batch.records:
                assert batch.pixels.shape == (1, 3, 224, 224)
                accepted.append(sample.caption)
            else:
                assert batch.rejections[0]["reason"] and batch.rejections[0]["detail"] is not None
                rejected[sample.caption] = batch.rejections[0]["reason"]
    assert len(accepted) + len(rejected) == len(pillow_corpus)
    assert slowest < limits.max_seconds + 8.0  # the limit covers decoding, not the resize after it
    by_reason = collections.Counter(rejected.values())
    print(
        f"\n{len(pillow_corpus)} files: {len(accepted)} accepted, {len(rejected)} rejected {dict(by_reason)}"
    )
    print(f"slowest image: {slowest:.2f} s")
    # what the corpus is chosen for
    assert rejected["copyscan-added/zero-byte.png"] == "empty_file"
    assert rejected["copyscan-added/truncated.jpg"] == "truncated"
    assert rejected["decompression_bomb.gif"] == "too_large"
    assert rejected["eps/1.eps"] == "unsupported_format"
    for name in (
        "16bit.cropped.tif",
        "pil_sample_cmyk.jpg",
        "hopper_gray.jpg",
        "transparent.png",
        "iss634.gif",
    ):
        assert name in accepted, rejected.get(name)
    assert "hopper_orientation_6.jpg" in accepted and "apng/num_plays.png" in accepted
    assert not any(name.endswith(".eps") for name in accepted)
    assert set(by_reason) <= {
        "empty_file",
        "truncated",
        "too_large",
        "too_small",
        "not_an_image",
        "decode_error",
        "unsupported_format",
        "decode_timeout",
    }


def _one_per_extension(corpus: dict[str, bytes]) -> dict[str, bytes]:
    first: dict[str, str] = {}
    for name in corpus:
        first.setdefault(name.rsplit("/", 1)[-1].rpartition(".")[2].lower(), name)
    return {name: corpus[name] for name in sorted(first.values())}


@pytest.mark.slow
def test_index_a_hostile_shard_then_scan_a_folder_of_every_format(ray_session, pillow_corpus, tmp_path):
    """End to end on local Ray: a shard of hostile members is indexed (its good samples) with every other
    member a counted rejection; a query folder of one file per extension of Pillow's corpus (plus hidden
    files) is scanned: every visible file is a query, embedded or rejected with a reason named in the
    summary, and the hidden ones and the sidecars (by name) are named as skipped."""
    from hostile_tars import hostile_shard

    from copyscan.indexing.index_config import IndexConfig
    from copyscan.indexing.index_ray import run_index
    from copyscan.indexing.runtime.config import resolve
    from copyscan.search.scan_config import ScanConfig
    from copyscan.search.scan_ray import run_scan

    shards = tmp_path / "work" / "shards"
    shards.mkdir(parents=True)
    hostile_shard(shards / "00000.tar")
    (shards / "00000.parquet").write_bytes(b"PAR1 not the tar's samples PAR1")  # img2dataset's, disagreeing
    out = tmp_path / "work" / "index"
    manifest = run_index(resolve(IndexConfig, {"shards": str(shards), "out": str(out)}))
    entry = manifest["embedding_shards"][0]
    assert entry["samples"] == 15 and entry["count"] == 4 and entry["rejected"] == 11
    assert entry["rejected_by_reason"] == {
        "duplicate_key": 2,
        "missing_image": 1,
        "no_extension": 1,
        "not_a_regular_file": 3,
        "unsafe_name": 4,
    }
    assert not any(p.name.startswith(("escape", "absolute", "up")) for p in tmp_path.rglob("*"))

    folder = tmp_path / "queries"
    # 9 MB of lossless JPEG 2000 that openjpeg takes 1-1.6 s to decode on this 2-core VM, 4x the limit below:
    # every file of the corpus chosen decodes in under 0.03 s but balloon.jpf (0.3-0.5 s, may time out too)
    slow = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (375, 375, 3), dtype=np.uint8)
    PIL.Image.fromarray(noise).resize((3000, 3000)).save(slow, "JPEG2000")
    files = _one_per_extension(pillow_corpus) | {
        "copyscan-added/zero-byte.png": b"",
        "copyscan-added/slow.jp2": slow.getvalue(),
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / ".thumbs").mkdir()
    (folder / ".thumbs" / "hopper.png").write_bytes(pillow_corpus["hopper.png"])
    # Pillow's folder holds a top-level hopper.tar: a folder of images beside .tar shards is refused
    scan_cfg = {
        "index": str(out),
        "queries": str(folder),
        "out": str(tmp_path / "scan"),
        "k": 2,
        # the product's limit, in the decode tasks on Ray; 8x the slowest corpus file's 0.03 s under load
        "max_decode_seconds": 0.25,
    }
    with pytest.raises(CopyscanError, match="mixes image files and .tar shards"):
        run_scan(resolve(ScanConfig, scan_cfg))
    assert not (tmp_path / "scan").exists()
    (folder / "nested").mkdir()
    os.replace(folder / "hopper.tar", folder / "nested" / "hopper.tar")  # deeper: a query like any file
    summary = run_scan(resolve(ScanConfig, scan_cfg))
    print(f"\n{len(files)} files: {summary['embedded']} embedded, {summary['rejected_by_reason']}")
    print(f"skipped: {summary['skipped']['by_reason']}")
    sidecars = sorted(name for name in files if name.endswith(".txt"))  # by name: metadata, not queries
    queries = len(files) - len(sidecars)
    assert summary["queries"] == queries and summary["embedded"] + summary["rejected"] == queries
    assert summary["embedded"] > queries // 2
    assert summary["skipped"] == {
        "count": 2 + len(sidecars),
        "by_reason": {"hidden": 2, "metadata_file": len(sidecars)},
        "files": [
            {"file": ".DS_Store", "reason": "hidden"},
            {"file": ".thumbs/hopper.png", "reason": "hidden"},
            *({"file": name, "reason": "metadata_file"} for name in sidecars),
        ],
    }
    examples = summary["rejected_examples"]
    assert set(examples) == set(summary["rejected_by_reason"])
    assert "copyscan-added/zero-byte.png" in examples["empty_file"]
    assert all(len(examples[r]) == min(n, 20) for r, n in summary["rejected_by_reason"].items())
    markers = [json.loads(p.read_text()) for p in (tmp_path / "scan" / "chunks").glob("*.json")]
    rejected = {r["key"]: r["reason"] for m in markers for r in m["rejections"]}
    assert rejected["copyscan-added/slow.jp2"] == "decode_timeout"
    assert rejected["nested/hopper.tar"] == "not_an_image" and len(rejected) == summary["rejected"]
    assert any(key.endswith(".eps") for key in examples["unsupported_format"])
    written = json.loads((tmp_path / "scan" / "summary.json").read_text())
    assert written["skipped"] == summary["skipped"] and written["rejected_examples"] == examples
