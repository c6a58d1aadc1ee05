"""Partial copies end to end: an index with a region index, and a scan with query windows, on local Ray."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from copyscan.indexing.embed.augment import paste_partial
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.index_config import IndexConfig
from copyscan.indexing.index_ray import run_index
from copyscan.indexing.models.regions import (
    HYBRID_CROPS,
    HYBRID_QUERY_SIZE,
    POOL_QUERY_SIZE,
    TRAIN_GRID,
    parse_grid,
    parse_slide,
)
from copyscan.indexing.read.images import open_rgb
from copyscan.indexing.runtime.config import resolve
from copyscan.indexing.store import layout
from copyscan.indexing.store.manifest import load_manifest
from copyscan.search.regions.geometry import box_iou, slide_boxes
from copyscan.search.results.matches import MATCHES_SCHEMA
from copyscan.search.scan_config import ScanConfig
from copyscan.search.scan_ray import run_scan

N_COPIES = 6
N_NEGATIVES = 6
TEST_QUERY_GRID = "0.3:5,0.4:4"  # 1 + 25 + 16 windows: the test's scan stays quick on 2 CPUs
SLIDE = "0.5,0.4"  # sliding windows (off by default) searched in the global index with the frames
DENSE = 3  # region candidates per query dense-verified (off by default)


@pytest.fixture(scope="module")
def region_index(ray_session, laion_shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("regions") / "index")
    cfg = resolve(IndexConfig, {"shards": laion_shards.folder, "out": out, "regions": "true"})
    return out, run_index(cfg)


@pytest.fixture(scope="module")
def pasted(laion_shards, real_images, tmp_path_factory):
    """Training images pasted at 35–50 % into scenes from outside the training set, and outside images
    pasted the same way; returns (folder, {file: source key or None}, {pasted file: its box, fractions})."""
    train = set(laion_shards.source_images)
    others = [p for p in real_images if p not in train]
    scenes, objects = others[:6], others[6 : 6 + N_NEGATIVES]
    rng = np.random.default_rng(5)
    sources = [laion_shards.source_images[i] for i in rng.choice(len(train), N_COPIES, replace=False)]
    folder = tmp_path_factory.mktemp("pasted")
    truth, boxes = {}, {}
    for i, obj in enumerate([*sources, *objects]):
        scene = open_rgb(scenes[i % len(scenes)])
        scene.thumbnail((640, 640))
        img, (x0, y0, x1, y1) = paste_partial(open_rgb(obj), scene, rng)
        name = f"q{i:02d}.jpg"
        img.save(folder / name, quality=92)
        truth[name] = laion_shards.key_of_source[obj] if i < N_COPIES else None
        boxes[name] = [x0 / img.width, y0 / img.height, x1 / img.width, y1 / img.height]
    # and one training image as it is (JPEG again): every aligned box matches itself
    exact = laion_shards.source_images[int(rng.integers(len(train)))]
    open_rgb(exact).save(folder / "exact.jpg", quality=95)
    truth["exact.jpg"] = laion_shards.key_of_source[exact]
    # and the lower-right region (0.55, 0.55, 1, 1) of another training image on its own: a part of an image
    part_source = laion_shards.source_images[int(rng.integers(len(train)))]
    whole = open_rgb(part_source)
    w, h = whole.size
    whole.crop((round(0.55 * w), round(0.55 * h), w, h)).save(folder / "part.jpg", quality=95)
    truth["part.jpg"] = laion_shards.key_of_source[part_source]
    return folder, truth, boxes


def test_region_index_layout_and_manifest(region_index, laion_shards):
    out, manifest = region_index
    boxes = parse_grid(TRAIN_GRID)
    regions = manifest["regions"]
    assert regions["per_image"] == len(boxes) == 14 and regions["boxes"] == [list(b) for b in boxes]
    assert regions["ntotal"] == manifest["ntotal"] * 14
    sub = load_manifest(layout.regions_root(out))
    assert sub["kind"] == "regions" and sub["build_id"] == regions["build_id"]
    assert sub["ntotal"] == regions["ntotal"] and sub["regions_of"]["per_image"] == 14
    # the region index whitens with the index's whitening (learned from whole images and their copies)
    assert sub["whitening"]["kind"] == "from-index" and sub["whitening"]["pairs"] == 0
    np.testing.assert_array_equal(
        np.load(os.path.join(layout.regions_root(out), sub["whitening"]["path"]))["proj"],
        np.load(os.path.join(out, manifest["whitening"]["path"]))["proj"],
    )
    for e in manifest["embedding_shards"]:
        xb = np.load(os.path.join(out, e["img_emb"]))
        xr = np.load(
            os.path.join(layout.regions_root(out), "embeddings", "img_emb", f"img_emb_{e['shard']:05d}.npy")
        )
        assert xr.shape == (e["count"] * 14, manifest["dim"])
        # box 0 of every image is the whole image (cropped from its 448 px version): about the global vector
        cos = np.sum(xr[::14].astype(np.float32) * xb.astype(np.float32), axis=1)
        assert cos.min() > 0.95, cos.min()
    # a rerun changes nothing
    again = run_index(resolve(IndexConfig, {"shards": laion_shards.folder, "out": out, "regions": "true"}))
    assert again["regions"]["build_id"] == regions["build_id"]


def test_scan_finds_pasted_training_images_with_their_boxes(region_index, pasted, tmp_path):
    index_url, manifest = region_index
    folder, truth, boxes = pasted
    out = str(tmp_path / "scan")
    cfg = {"index": index_url, "queries": str(folder), "out": out, "split_product": "true"}
    cfg.update(region_query_grid=TEST_QUERY_GRID, region_slide=SLIDE, dense_verify=DENSE)
    summary = run_scan(resolve(ScanConfig, cfg))
    assert summary["regions"]["windows"] == len(parse_grid(TEST_QUERY_GRID))
    assert summary["regions"]["split_product"] is True
    table = pq.read_table(os.path.join(out, "matches"))
    assert table.schema.equals(MATCHES_SCHEMA)
    rows = table.to_pylist()
    best_local = {r["query_id"]: r for r in rows if r["local_rank"] == 0}
    best_global = {r["query_id"]: r for r in rows if r["rank"] == 0}
    assert set(best_local) == set(best_global) == set(truth)
    # a part of a training image: its whole-query window matches that image's lower-right region
    part = best_local["part.jpg"]
    assert part["train_key"] == truth["part.jpg"], part
    assert part["train_box"] == pytest.approx([0.55, 0.55, 1.0, 1.0]) and part["query_box"] == [0, 0, 1, 1]
    assert part["local_score"] > 0.9 and part["local_score_norm"] > max(
        best_local[q]["local_score_norm"] for q, key in truth.items() if not key
    )
    # pasted objects (recall over a real set is measured by bench/partial_copies.py): boxes are well formed
    pasted_copies = [q for q, key in truth.items() if key and q not in ("exact.jpg", "part.jpg")]
    local_hits = [q for q in pasted_copies if best_local[q]["train_key"] == truth[q]]
    for q in local_hits:
        x0, y0, x1, y1 = best_local[q]["query_box"]
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        if best_local[q]["train_box"] == [0, 0, 1, 1] and best_local[q]["crop_box"] == [x0, y0, x1, y1]:
            continue  # found by a crop of the query only (localise, then search): the crop on the whole image
        # a window of the query (the whole query too: it may best match one of the source's regions)
        assert [x0, y0, x1, y1] in [pytest.approx(list(b)) for b in parse_grid(TEST_QUERY_GRID)]
        assert best_local[q]["train_box"] in [pytest.approx(list(b)) for b in parse_grid(TRAIN_GRID)]
    # localise, then search: crops where region matching located training images, and sliding windows,
    # searched in the global index; an image's best crop score adds to its local_score_norm
    assert summary["regions"]["refine"] == ScanConfig.region_refine
    assert summary["regions"]["slide"] == [list(size) for size in parse_slide(SLIDE)]
    by_crop = [r for r in rows if r["crop_score_norm"] is not None]
    assert by_crop, "no crop found anything"
    slid = [
        r
        for r in by_crop
        for box in slide_boxes(parse_slide(SLIDE), *Image.open(folder / r["query_id"]).size)
        if np.allclose(r["crop_box"], box, atol=1e-6)
    ]
    assert slid, "no sliding window found anything"
    for r in by_crop:
        x0, y0, x1, y1 = r["crop_box"]
        assert r["local_rank"] is not None and 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        assert (x1 - x0) * (y1 - y0) < 0.8  # the whole query is the global search's, never a crop
    assert all(
        r["crop_score_norm"] is None and r["crop_box"] is None for r in rows if r["local_rank"] is None
    )
    # the unmodified training image: found both ways, whole window on whole image, every aligned box matching
    exact = best_global["exact.jpg"]
    assert exact["train_key"] == truth["exact.jpg"] and exact["local_rank"] == 0
    assert exact["split_score"] > 0.9 and exact["local_score"] > 0.9
    # split_score is a cosine for every row (position-aligned: a pasted object elsewhere scores low)
    assert all(r["split_score"] is not None and -1.0001 <= r["split_score"] <= 1.0001 for r in rows)
    # every query keeps its k global rows; rows found only by regions have no rank and no global scores
    ranked = [r for r in rows if r["rank"] is not None]
    assert len(ranked) == len(truth) * min(10, manifest["ntotal"])
    assert all(r["score"] is None for r in rows if r["rank"] is None)
    # dense verification of each query's best DENSE region candidates: fetched, placed, scored
    selected = [r for r in rows if r["local_rank"] is not None and r["local_rank"] < DENSE]
    dense = summary["verification"]["dense"]
    assert dense["pairs"] == len(selected) and dense["errors"] == {}
    assert dense["verified"] + dense["no_fit"] == len(selected) and dense["verified"] > 0
    for r in rows:
        if r["dense_z"] is None:
            assert r["dense_score"] is None and r["dense_box"] is None and r["dense_error"] is None
            assert r["dense_rank"] is None
            continue
        assert r in selected
        assert r["dense_score"] == pytest.approx(r["local_score_norm"] + 0.05 * r["dense_z"], rel=1e-5)
        x0, y0, x1, y1 = r["dense_box"]
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    # each query's verified candidates are ranked 0, 1, ... by dense_z
    for q in truth:
        verified = sorted((r for r in selected if r["query_id"] == q and r["dense_z"] is not None),
                          key=lambda r: r["dense_rank"])  # fmt: skip
        assert [r["dense_rank"] for r in verified] == list(range(len(verified)))
        assert all(a["dense_z"] >= b["dense_z"] for a, b in zip(verified, verified[1:], strict=False))
    # where a pasted source was verified, it is placed where it was pasted
    placed = [
        box_iou(r["dense_box"], boxes[r["query_id"]])
        for r in selected
        if r["dense_z"] is not None and r["query_id"] in boxes and r["train_key"] == truth[r["query_id"]]
    ]
    assert placed and np.median(placed) >= 0.5, placed
    # a rerun resumes: nothing to do
    assert run_scan(resolve(ScanConfig, cfg))["this_run"]["chunks"] == 0


def test_scan_regions_off(region_index, pasted, tmp_path):
    index_url, _ = region_index
    folder, _, _ = pasted
    out = str(tmp_path / "off")
    cfg = resolve(ScanConfig, {"index": index_url, "queries": str(folder), "out": out, "regions": "off"})
    summary = run_scan(cfg)
    assert summary["regions"] is None
    table = pq.read_table(os.path.join(out, "matches"))
    assert table["local_rank"].null_count == table.num_rows and table["rank"].null_count == 0


@pytest.mark.slow
def test_scan_with_windows_pooled_from_one_pass(region_index, pasted, tmp_path):
    """region_query_mode=pool: the windows come from one forward pass at POOL_QUERY_SIZE; the frames are
    still cropped (from those pixels) and searched globally; the exact copy and the part are found."""
    index_url, _ = region_index
    folder, truth, _ = pasted
    out = str(tmp_path / "pool")
    cfg = {"index": index_url, "queries": str(folder), "out": out, "region_query_mode": "pool"}
    summary = run_scan(resolve(ScanConfig, {**cfg, "region_query_grid": TEST_QUERY_GRID}))
    assert summary["regions"]["query_mode"] == "rmac" and summary["regions"]["query_size"] == POOL_QUERY_SIZE
    rows = pq.read_table(os.path.join(out, "matches")).to_pylist()
    best_local = {r["query_id"]: r for r in rows if r["local_rank"] == 0}
    assert set(best_local) == set(truth)
    for name in ("exact.jpg", "part.jpg"):
        assert best_local[name]["train_key"] == truth[name], best_local[name]
    # the part's best pair is a region of its source that overlaps the part (pooled windows see context:
    # not always the lower-right region itself, as with crops)
    assert box_iou(best_local["part.jpg"]["train_box"], (0.55, 0.55, 1.0, 1.0)) > 0.1, best_local["part.jpg"]
    negatives = max(best_local[q]["local_score_norm"] for q, key in truth.items() if not key)
    assert best_local["exact.jpg"]["local_score_norm"] > negatives, best_local["exact.jpg"]
    assert any(r["crop_score_norm"] is not None for r in rows), "no frame found anything"
    grid = [pytest.approx(list(b)) for b in parse_grid(TEST_QUERY_GRID)]
    assert all(r["query_box"] in grid for r in best_local.values() if r["train_box"] != [0, 0, 1, 1])


@pytest.mark.slow
def test_scan_with_hybrid_windows_recrops_the_best_pooled_ones(region_index, pasted, tmp_path):
    """region_query_mode=hybrid: windows pooled from one pass at HYBRID_QUERY_SIZE, the best HYBRID_CROPS of
    each query cropped and searched again; the exact copy and the part are found, the exact copy above
    every unrelated query."""
    index_url, _ = region_index
    folder, truth, _ = pasted
    out = str(tmp_path / "hybrid")
    cfg = {"index": index_url, "queries": str(folder), "out": out, "region_query_mode": "hybrid"}
    summary = run_scan(resolve(ScanConfig, {**cfg, "region_query_grid": TEST_QUERY_GRID}))
    regions = summary["regions"]
    assert (regions["query_mode"], regions["query_size"], regions["recrop"]) == (
        "rmac",
        HYBRID_QUERY_SIZE,
        HYBRID_CROPS,
    )
    rows = pq.read_table(os.path.join(out, "matches")).to_pylist()
    best_local = {r["query_id"]: r for r in rows if r["local_rank"] == 0}
    assert set(best_local) == set(truth)
    for name in ("exact.jpg", "part.jpg"):
        assert best_local[name]["train_key"] == truth[name], best_local[name]
    negatives = max(best_local[q]["local_score_norm"] for q, key in truth.items() if not key)
    assert best_local["exact.jpg"]["local_score_norm"] > negatives, best_local["exact.jpg"]


def test_regions_on_needs_a_region_index(region_index):
    from copyscan.search.regions.windows import local_windows

    index_url, manifest = region_index
    cfg = resolve(ScanConfig, {"index": index_url, "queries": "q", "out": "o", "regions": "on"})
    assert local_windows(cfg, manifest) is not None
    with pytest.raises(CopyscanError, match="no region index"):
        local_windows(cfg, {**manifest, "regions": None})
    auto = resolve(ScanConfig, {"index": index_url, "queries": "q", "out": "o"})
    assert local_windows(auto, {**manifest, "regions": None}) is None


def test_hybrid_recrops_region_recrop_windows_per_query(region_index):
    """region_recrop sets how many pooled windows a hybrid scan cuts out again (HYBRID_CROPS by default);
    cropped windows are all cut already, so crop mode recrops none."""
    from copyscan.search.regions.windows import local_windows

    index_url, manifest = region_index
    base = {"index": index_url, "queries": "q", "out": "o", "region_query_mode": "hybrid"}
    assert local_windows(resolve(ScanConfig, base), manifest).recrop == HYBRID_CROPS
    assert local_windows(resolve(ScanConfig, {**base, "region_recrop": 3}), manifest).recrop == 3
    crop = {**base, "region_query_mode": "crop", "region_recrop": 3}
    assert local_windows(resolve(ScanConfig, crop), manifest).recrop == 0
    with pytest.raises(CopyscanError, match="region_recrop"):
        resolve(ScanConfig, {**base, "region_recrop": -1})


def test_calibrate_partial_then_scan_flags_partial_answers(
    region_index, pasted, laion_shards, real_images, tmp_path
):
    """copyscan calibrate partial=N outside=URL pastes training images and outside images into outside scenes,
    scans them with the partial settings and stores the answer's thresholds; a scan with those settings
    flags is_partial_copy on each query's answer, one with other settings leaves it empty and says why."""
    import shutil

    from copyscan.search.calibrate.config import CalibrateConfig
    from copyscan.search.calibrate.whole import format_table, run_calibrate

    index_url = str(tmp_path / "index")
    shutil.copytree(region_index[0], index_url)  # calibration rewrites the manifest
    train = set(laion_shards.source_images)
    outside = tmp_path / "outside"
    outside.mkdir()
    for path in [p for p in real_images if p not in train][12:20]:  # not used by ``pasted``
        shutil.copy(path, outside / path.name)
    settings = {"region_query_grid": TEST_QUERY_GRID, "region_slide": SLIDE, "dense_verify": DENSE}
    cal_cfg = resolve(
        CalibrateConfig,
        {"index": index_url, "images": 20, "partial": 6, "outside": str(outside), "partial_scan": settings},
    )
    report = run_calibrate(cal_cfg)
    partial = report["partial"]
    assert (partial["copies"], partial["negatives"], partial["scenes"]) == (6, 6, 2) and not partial[
        "skipped"
    ]
    assert partial["answer"] == {"rank": "dense_rank", "score": "dense_score"}
    assert partial["settings"]["dense_verify"] == DENSE and partial["settings"]["region_refine"] == 5
    assert partial["recall@1"] >= 0.5
    assert [r["precision"] for r in partial["table"]] == [0.5, 0.8, 0.9, 0.95, 0.99]
    # 6 + 6 pastes cannot promise 90 % precision with the default 90 % confidence, and the table says so
    assert partial["confidence"] == 0.9 and partial["thresholds"]["p90"] is None
    assert "dense_score" in format_table(report) and "calibrate with more, partial=N" in format_table(report)
    # the set and its scan are kept: a rerun resumes them; the point estimate (confidence=0) gives thresholds
    cal_cfg = dataclasses.replace(cal_cfg, confidence=0.0)
    again = run_calibrate(cal_cfg)
    partial = again["partial"]
    assert partial["scan_seconds"] < 30 and partial["confidence"] == 0.0
    stored = load_manifest(index_url)["calibration"]["partial"]
    assert stored["thresholds"] == partial["thresholds"] and stored["settings"] == partial["settings"]
    p90 = partial["thresholds"]["p90"]
    assert p90 is not None

    folder, truth, _ = pasted
    out = tmp_path / "scan"
    summary = run_scan(
        resolve(ScanConfig, {"index": index_url, "queries": str(folder), "out": str(out), **settings})
    )
    assert (
        summary["partial_threshold"]["value"] == p90
        and summary["partial_threshold"]["column"] == "dense_score"
    )
    rows = pq.read_table(str(out / "matches")).to_pylist()
    for r in rows:
        if r["dense_rank"] == 0 and r["dense_score"] is not None:
            assert r["is_partial_copy"] == (r["dense_score"] >= p90)
        else:
            assert r["is_partial_copy"] is None
    flagged = {r["query_id"] for r in rows if r["is_partial_copy"]}
    assert summary["flagged_partial"] == len(flagged)
    whole = {r["query_id"] for r in rows if r["rank"] == 0 and r["is_copy"]}
    assert summary["flagged_any"] == len(flagged | whole)
    copies = {q for q, key in truth.items() if key}
    assert len(flagged & copies) >= len(flagged - copies)

    other = tmp_path / "other"
    summary = run_scan(
        resolve(
            ScanConfig,
            {"index": index_url, "queries": str(folder), "out": str(other), **settings, "dense_verify": 0},
        )
    )
    assert summary["partial_threshold"]["calibrated"] is False
    assert "dense_verify=3 (this scan: 0)" in summary["partial_threshold"]["why"]
    assert pq.read_table(str(other / "matches"))["is_partial_copy"].null_count == summary["matches"]
