"""LAION-style precomputed CLIP embeddings imported into an index (no images read), then scanned with the
same image encoder given as TorchScript. The test makes both: a small scripted network stands in for CLIP's
image tower (nothing can be downloaded here), and its embeddings of the training images, written in
clip-retrieval's layout, stand in for LAION's published ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.index_config import IndexConfig
from copyscan.indexing.index_ray import run_index
from copyscan.indexing.runtime.config import resolve
from copyscan.search.scan_config import ScanConfig
from copyscan.search.scan_ray import run_scan

# the test writes its stand-in encoder with torch.jit, which torch 2.13 marks deprecated
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


class TinyTower(torch.nn.Module):
    """(B, 3, 224, 224) CLIP-normalised → (B, d): the contract of a traced CLIP visual tower."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, kernel_size=8, stride=8)
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.proj = torch.nn.Linear(16 * 16, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def _tower(path: Path, dim: int, seed: int) -> str:
    torch.manual_seed(seed)
    torch.jit.save(torch.jit.script(TinyTower(dim).eval()), str(path))
    return str(path)


@pytest.fixture(scope="module")
def clip_folder(laion_shards, tmp_path_factory):
    """clip-retrieval parts of the training images: img_emb/img_emb_{0,1}.npy + metadata/metadata_{0,1}.parquet."""
    from copyscan.indexing.models.embedders import load_embedder

    root = tmp_path_factory.mktemp("clip")
    weights = _tower(root / "tower.torchscript.pt", 32, seed=0)
    embedder = load_embedder("laion-clip", weights, "cpu", {"model": "tiny-test"})
    sources = list(laion_shards.source_images)
    pixels = np.stack([embedder.preprocess(Image.open(p)) for p in sources])
    x = embedder.embed(pixels).astype(np.float16)
    x[40] = 0  # a broken row, as a real dump can have: rejected with a reason
    folder = root / "laion"
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    for part, rows in enumerate((range(0, 30), range(30, len(sources)))):
        rows = list(rows)
        np.save(folder / "img_emb" / f"img_emb_{part}.npy", x[rows])
        meta = pa.table(
            {
                "image_path": [f"{part:05d}/{r:09d}" for r in rows],
                "caption": [f"caption {r}" for r in rows],
                "url": [f"http://laion.example/{r}.jpg" for r in rows],
                "key": [laion_shards.key_of_source[sources[r]] for r in rows],
                "width": [256] * len(rows),
                "height": [256] * len(rows),
                "NSFW": ["UNLIKELY"] * len(rows),
                "similarity": [0.3] * len(rows),
                "LICENSE": ["cc-by-4.0" if r % 2 else "?" for r in rows],
                "pwatermark": [r / 100 for r in rows],
                "punsafe": [None if r == 7 else 0.01 for r in rows],
            }
        )
        pq.write_table(meta, folder / "metadata" / f"metadata_{part}.parquet")
    return folder, weights, sources


def test_import_precomputed_clip_embeddings_and_scan(ray_session, clip_folder, laion_shards, tmp_path):
    folder, weights, sources = clip_folder
    out = str(tmp_path / "index")
    manifest = run_index(
        resolve(
            IndexConfig,
            {
                "shards": str(folder),
                "out": out,
                "embedder": "laion-clip",
                "embedder_options": {"model": "tiny-test"},
            },
        )
    )
    assert manifest["embedder"]["name"] == "laion-clip" and manifest["embedder"]["model"] == "tiny-test"
    assert manifest["dim"] == 32 and manifest["ntotal"] == len(sources) - 1
    assert [e["source"].rsplit("/", 1)[-1] for e in manifest["embedding_shards"]] == [
        "img_emb_0.npy",
        "img_emb_1.npy",
    ]
    assert manifest["embedding_shards"][1]["rejected_by_reason"] == {"bad_vector": 1}
    # no images, so no augmented pairs: PCA-whitening, and the manifest says why
    assert manifest["whitening"]["kind"] == "pca" and "pairs" in manifest["whitening"]["fallback"]
    meta = pq.read_table(Path(out) / manifest["embedding_shards"][0]["metadata"])
    assert (
        meta.column("url")[0].as_py() == "http://laion.example/0.jpg"
        and meta.column("width")[0].as_py() == 256
    )

    queries = tmp_path / "queries"
    queries.mkdir()
    chosen = [0, 7, 33, 51]
    for i in chosen:
        shutil.copy(sources[i], queries / f"q{i}{Path(sources[i]).suffix}")
    scan_out = tmp_path / "scan"
    run_scan(
        resolve(ScanConfig, {"index": out, "queries": str(queries), "out": str(scan_out), "weights": weights})
    )
    table = pq.read_table(scan_out / "matches")
    top = {r["query_id"]: r for r in table.filter(pc.equal(table["rank"], 0)).to_pylist()}
    for i in chosen:
        row = top[f"q{i}{Path(sources[i]).suffix}"]
        assert row["train_key"] == laion_shards.key_of_source[sources[i]] and row["score_raw"] > 0.99
        # LAION's provenance columns, kept by the import and carried into the matches
        assert row["license"] == ("cc-by-4.0" if i % 2 else "?") and row["clip_similarity"] == pytest.approx(
            0.3
        )
        assert row["pwatermark"] == pytest.approx(i / 100) and row["sha256"] is None
        assert row["punsafe"] == (None if i == 7 else pytest.approx(0.01))

    # another encoder (a different output size) is refused, as is calibration (there are no images)
    other = _tower(tmp_path / "other.torchscript.pt", 16, seed=1)
    with pytest.raises(CopyscanError, match="differs"):
        run_scan(
            resolve(
                ScanConfig,
                {"index": out, "queries": str(queries), "out": str(tmp_path / "s2"), "weights": other},
            )
        )
    from copyscan.search.calibrate.config import CalibrateConfig
    from copyscan.search.calibrate.whole import run_calibrate

    with pytest.raises(CopyscanError, match="no images"):
        run_calibrate(resolve(CalibrateConfig, {"index": out}))


def test_import_refuses_what_is_not_clip_retrieval(ray_session, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CopyscanError, match="not a clip-retrieval embeddings folder"):
        run_index(
            resolve(
                IndexConfig,
                {
                    "shards": str(tmp_path / "empty"),
                    "out": str(tmp_path / "idx"),
                    "embedder": "laion-clip",
                    "embedder_options": {"model": "ViT-L-14"},
                },
            )
        )
    with pytest.raises(CopyscanError, match="needs the CLIP model"):
        from copyscan.indexing.models.clip import clip_spec

        clip_spec({}, 768)
