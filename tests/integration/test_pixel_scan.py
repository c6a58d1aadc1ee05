"""Pixel verification inside ``copyscan scan`` (verify_pixels): real index, local Ray, re-fetched originals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from copyscan.indexing.index_config import IndexConfig
from copyscan.indexing.index_ray import run_index
from copyscan.indexing.read.reader import iter_tar
from copyscan.indexing.runtime.config import resolve
from copyscan.search.results.matches import MATCHES_SCHEMA
from copyscan.search.scan_config import ScanConfig
from copyscan.search.scan_ray import run_scan
from copyscan.search.verify import pixel


def scan(index_url: str, queries: str, out: str, **overrides) -> dict:
    return run_scan(resolve(ScanConfig, {"index": index_url, "queries": queries, "out": out, **overrides}))


@pytest.fixture(scope="module")
def flat_index(ray_session, laion_shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pixel") / "index")
    run_index(resolve(IndexConfig, {"shards": laion_shards.folder, "out": out}))
    return out


def test_scan_verifies_pixels_of_planted_copies(flat_index, laion_shards, real_images, tmp_path):
    # generations: two training images as the shard holds them, one shifted by a known uniform offset
    # (ℓ2 = tiled ℓ2 = 6/255 after alignment, where no pixel clips), one left as it is; and an image
    # from outside the training set
    first = next(iter_tar(laion_shards.shard_urls[0]))
    second = list(iter_tar(laion_shards.shard_urls[1]))[3]
    folder = tmp_path / "gens"
    folder.mkdir()
    aligned = pixel.decode_pixels(first.image, 512).astype(np.int32)
    shifted = np.clip(aligned + 6, 0, 255)
    unclipped = aligned <= 249
    Image.fromarray(shifted.astype(np.uint8)).save(folder / "shifted.png")
    (folder / "same.jpg").write_bytes(second.image)
    Image.open(real_images[-1]).convert("RGB").save(folder / "outside.png")
    expected_l2 = np.sqrt(((shifted - aligned) ** 2 / 255.0**2).mean())
    assert unclipped.mean() > 0.9

    out = str(tmp_path / "scan")
    summary = scan(flat_index, str(folder), out, k=3, verify_pixels=2)
    table = pq.read_table(Path(out) / "matches")
    assert table.schema.equals(MATCHES_SCHEMA)
    rows = {(r["query_id"], r["rank"]): r for r in table.to_pylist()}
    top = rows[("shifted.png", 0)]
    assert top["train_key"] == first.key
    assert top["pixel_l2"] == pytest.approx(expected_l2, abs=1e-4) and top["extracted"] is True
    assert rows[("same.jpg", 0)]["train_key"] == second.key
    assert rows[("same.jpg", 0)]["tiled_l2"] == 0.0 and rows[("same.jpg", 0)]["extracted"] is True
    assert rows[("outside.png", 0)]["tiled_l2"] > 0.15 and rows[("outside.png", 0)]["extracted"] is False
    assert all(r["tiled_l2"] is not None for (q, rank), r in rows.items() if rank < 2)
    assert all(
        r["tiled_l2"] is None and r["verify_error"] is None for (q, rank), r in rows.items() if rank == 2
    )
    verification = summary["verification"]
    assert verification["pairs"] == verification["verified"] == 6 and verification["errors"] == {}
    assert verification["extracted_queries"] == 2 and summary["extraction_delta"] == 0.15
    marker = json.loads((Path(out) / "chunks" / "chunk_00000.json").read_text())
    assert marker["verify"]["verified"] == 6


def test_webdataset_queries_are_refetched_from_their_shard(flat_index, laion_shards, tmp_path):
    """Query shards: query_source is the shard, query_id the key; the training shards scanned against
    themselves are pixel-identical at rank 0."""
    out = str(tmp_path / "scan_tars")
    summary = scan(flat_index, laion_shards.folder, out, k=2, verify_pixels=1)
    matches = pq.read_table(Path(out) / "matches")
    table = matches.filter(pc.equal(matches["rank"], 0))
    assert set(table["query_source"].to_pylist()) == set(laion_shards.shard_urls)
    assert pc.all(pc.equal(table["query_id"], table["train_key"])).as_py()
    assert pc.max(table["tiled_l2"]).as_py() == 0.0 and pc.all(table["extracted"]).as_py()
    assert summary["verification"]["extracted_queries"] == table.num_rows == len(laion_shards.key_of_source)


def test_verification_settings_are_checked(flat_index, tmp_path):
    from copyscan.indexing.errors import CopyscanError

    with pytest.raises(CopyscanError, match="verify_pixels must be between 0"):
        scan(flat_index, str(tmp_path), str(tmp_path / "x"), k=3, verify_pixels=4)
    with pytest.raises(CopyscanError, match="verify_size"):
        scan(flat_index, str(tmp_path), str(tmp_path / "x"), verify_pixels=1, verify_size=510)
    with pytest.raises(CopyscanError, match="keeps only k = 3 per query: set k >= 50"):
        scan(flat_index, str(tmp_path), str(tmp_path / "x"), k=3, verify_pixels=1, density_neighbours=50)
    with pytest.raises(CopyscanError, match="set verify_pixels >= 1"):
        scan(flat_index, str(tmp_path), str(tmp_path / "x"), k=3, density_neighbours=3)
    with pytest.raises(CopyscanError, match="verify_cpus must be positive"):
        scan(flat_index, str(tmp_path), str(tmp_path / "x"), verify_pixels=1, verify_cpus=0)


def test_verification_tasks_write_chunks_and_resume(flat_index, laion_shards, tmp_path):
    """One verification task per chunk (at most one in flight here, so the scan waits for it): each chunk's
    marker, written by its task after verification, holds the counts; a chunk whose marker is missing (a
    crash before the task finished) is scanned and verified again on resume, and only that chunk."""
    folder = tmp_path / "gens"
    folder.mkdir()
    for sample in list(iter_tar(laion_shards.shard_urls[2]))[:3]:
        (folder / f"{sample.key}.jpg").write_bytes(sample.image)
    out = tmp_path / "scan"
    settings = {"k": 2, "verify_pixels": 1, "chunk_size": 1, "verify_in_flight": 1, "density_neighbours": 2}
    first = scan(flat_index, str(folder), str(out), **settings)
    assert first["chunks"] == 3 and first["verification"]["verified"] == 3
    # density-relative score from each query's top 2 matches: the pixel-identical rank 0 scores 0
    assert first["verification"]["density"] == {
        "density_scored": 3,
        "density_extracted": 3,
        "neighbour_pairs": 6,
        "neighbour_failed": 0,
    }
    markers = {p.name: json.loads(p.read_text()) for p in (out / "chunks").glob("chunk_*.json")}
    assert len(markers) == 3 and all(
        m["verify"]["verified"] == m["verify"]["verify_pairs"] == 1 for m in markers.values()
    )
    before = pq.read_table(out / "matches").sort_by([("query_id", "ascending"), ("rank", "ascending")])

    (out / "chunks" / "chunk_00001.json").unlink()
    (out / "matches" / "part-00001.parquet").unlink()
    again = scan(flat_index, str(folder), str(out), **settings)
    assert again["this_run"]["chunks"] == 1 and again["chunks"] == 3
    assert json.loads((out / "chunks" / "chunk_00001.json").read_text())["verify"]["verified"] == 1
    after = pq.read_table(out / "matches").sort_by([("query_id", "ascending"), ("rank", "ascending")])
    assert after.select(["query_id", "train_key", "tiled_l2", "extracted"]).equals(
        before.select(["query_id", "train_key", "tiled_l2", "extracted"])
    )
    top = after.filter(pc.equal(after["rank"], 0))
    assert pc.all(pc.equal(top["tiled_l2"], 0.0)).as_py() and pc.all(pc.equal(top["density_l2"], 0.0)).as_py()
    assert after.filter(pc.equal(after["rank"], 1))["density_l2"].null_count == 3


@pytest.mark.slow
def test_scan_reranks_whole_copies_by_dense_verification(flat_index, generated, laion_shards, tmp_path):
    """verify_whole: every query's top matches re-fetched and re-ranked; each query gets one answer
    (verify_rank 0) with its verify_score, the planted copies' answers are their sources, and the counts
    reach the marker and the summary."""
    folder, truth = generated
    out = tmp_path / "scan_whole"
    summary = scan(flat_index, str(folder), str(out), k=4, verify_whole=4)
    table = pq.read_table(out / "matches")
    assert table.schema.equals(MATCHES_SCHEMA)
    whole = summary["verification"]["whole"]
    assert whole["pairs"] == whole["verified"] == table.num_rows == 4 * len(truth) and whole["errors"] == {}
    answers = {r["query_id"]: r for r in table.filter(pc.equal(table["verify_rank"], 0)).to_pylist()}
    assert len(answers) == len(truth)
    copies = [t for t in truth if t["is_copy"]]
    right = [
        answers[t["file"]]["train_key"] == laion_shards.key_of_source[Path(t["source_image"])] for t in copies
    ]
    assert sum(right) >= len(copies) - 1, right
    # a copy's answer stands out: its verify_score is above every unrelated image's answer's
    copy_scores = [answers[t["file"]]["verify_score"] for t, ok in zip(copies, right, strict=True) if ok]
    unrelated = [answers[t["file"]]["verify_score"] for t in truth if not t["is_copy"]]
    assert np.median(copy_scores) > max(unrelated)
    marker = json.loads((out / "chunks" / "chunk_00000.json").read_text())
    assert marker["verify"]["whole_verified"] == 4 * len(truth)
