"""A scan against an index it cannot search (another embedder, dimension or whitening) is refused before
any work: before its output is claimed, before a query is read."""

from __future__ import annotations

import numpy as np
import pytest

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.embedder import spec_fingerprint
from copyscan.indexing.runtime.config import resolve
from copyscan.indexing.store import storage
from copyscan.indexing.store.manifest import FORMAT
from copyscan.search.scan import prepare_scan
from copyscan.search.scan_config import ScanConfig

SPEC = {"name": "effnet-lite0", "dim": 256, "preprocess": {"kind": "squash", "size": 224}}


def _index(tmp_path, whitening_dim: int | None) -> str:
    url = str(tmp_path / "index")
    manifest = {
        "format": FORMAT,
        "embedder": SPEC,
        "embedder_fingerprint": spec_fingerprint(SPEC),
        "config": {"weights": None, "embedder_options": {}},
        "whitening": None,
    }
    if whitening_dim is not None:
        d = whitening_dim
        storage.save_npz(
            url + "/whitening.npz", mean=np.zeros(d, np.float32), proj=np.eye(d, dtype=np.float32)
        )
        manifest["whitening"] = {"kind": "pca", "path": "whitening.npz"}
    storage.write_json(url + "/manifest.json", manifest)
    return url


def _scan(tmp_path, index: str, spec: dict) -> None:
    (tmp_path / "q").mkdir(exist_ok=True)
    (tmp_path / "q" / "a.png").write_bytes(b"not read before the checks")
    cfg = resolve(ScanConfig, {"index": index, "queries": str(tmp_path / "q"), "out": str(tmp_path / "out")})
    prepare_scan(cfg, lambda name, weights, options: spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({**SPEC, "name": "sscd"}, "name: index 'effnet-lite0' vs query 'sscd'"),
        ({**SPEC, "dim": 512}, "dim: index 256 vs query 512"),
        ({**SPEC, "preprocess": {"kind": "squash", "size": 288}}, "preprocess"),
    ],
)
def test_another_embedder_or_dimension_is_refused_before_any_output(tmp_path, spec, message):
    with pytest.raises(CopyscanError, match=message):
        _scan(tmp_path, _index(tmp_path, None), spec)
    assert not (tmp_path / "out").exists()


def test_a_whitening_of_another_dimension_or_missing_is_refused(tmp_path):
    index = _index(tmp_path, 128)
    with pytest.raises(
        CopyscanError, match=r"whitening.npz: whitening of shapes .* does not fit the index's 256"
    ):
        _scan(tmp_path, index, SPEC)
    assert not (tmp_path / "out").exists()
    (tmp_path / "index" / "whitening.npz").unlink()
    with pytest.raises(CopyscanError, match="whitening file the manifest of .* names is missing"):
        _scan(tmp_path, index, SPEC)
    assert not (tmp_path / "out").exists()
