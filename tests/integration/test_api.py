"""The Python API (``import copyscan``): the jobs, a scan's results, and an index searched in this process
with images, vectors, and as a Ray Data ``map_batches`` function; all agree with ``copyscan scan``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

import copyscan
from copyscan.indexing.errors import CopyscanError

KEY = ("query_id", "rank", "train_key")


def _rows(table, id_of=lambda q: q):
    return {(id_of(r["query_id"]), r["rank"], r["train_key"]): r for r in table.to_pylist()}


def test_import_copyscan_loads_neither_torch_nor_ray():
    code = "import copyscan, sys; print(sorted(m for m in ('torch', 'ray', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_api_jobs_index_scan_and_search_agree(ray_session, laion_shards, generated, tmp_path):
    import ray

    folder, _ = generated
    manifest = copyscan.index(laion_shards.folder, str(tmp_path / "index"), max_shard_vectors=20)
    index_url = str(tmp_path / "index")
    summary = copyscan.scan(index_url, str(folder), str(tmp_path / "scan"), k=5, threshold="somepalli")
    scanned = copyscan.open_run(str(tmp_path / "scan")).to_table()
    assert scanned.num_rows == summary["matches"] == 5 * summary["queries"]
    assert (
        copyscan.open_run(str(tmp_path / "scan"), engine="duckdb").count("*").fetchall()[0][0]
        == scanned.num_rows
    )
    want = _rows(scanned)

    index = copyscan.Index(index_url, k=5, threshold="somepalli")
    files = sorted(p for p in Path(folder).iterdir() if p.suffix == ".jpg")
    by_path = index.search([str(p) for p in files], ids=[p.name for p in files])
    assert set(_rows(by_path)) == set(want)
    for key, row in _rows(by_path).items():
        assert row["score"] == pytest.approx(want[key]["score"], abs=1e-5)
        assert row["score_norm"] == pytest.approx(want[key]["score_norm"], abs=1e-5)
        assert row["is_copy"] == want[key]["is_copy"] and row["sha256"] == want[key]["sha256"]
    # vectors: the same answers (query_id: their position)
    xq = index.embed([str(p) for p in files])
    assert xq.shape == (len(files), manifest["dim"])
    by_vector = index.search(xq)
    assert set(_rows(by_vector, lambda q: files[int(q)].name)) == set(want)

    # Ray Data: read_images, then Index as a map_batches class, 0.5 CPU per actor
    ds = ray.data.read_images(str(folder), include_paths=True, file_extensions=["jpg"])
    matches = ds.map_batches(
        copyscan.Index,
        fn_constructor_args=(index_url,),
        fn_constructor_kwargs={"k": 5, "threshold": "somepalli"},
        batch_size=8,
        concurrency=1,
        num_cpus=0.5,
    ).to_arrow_refs()
    table = __import__("pyarrow").concat_tables(ray.get(matches))
    assert set(_rows(table, lambda q: Path(q).name)) == set(want)

    def flagged(t):  # generations whose best match is flagged (the summary's count)
        return pc.sum(t.filter(pc.equal(t["rank"], 0))["is_copy"].cast("int64")).as_py()

    assert 0 < flagged(by_path) == flagged(table) == summary["flagged"]

    with pytest.raises(CopyscanError, match=r"vectors of shape \(2, 3\)"):
        index.search(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(CopyscanError, match="not_an_image"):
        index.search([b"not an image"])
    with pytest.raises(CopyscanError, match="unknown key"):
        copyscan.Index(index_url, kk=3)
