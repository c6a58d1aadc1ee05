import pytest
import yaml

from indexing.errors import CopyscanError
from indexing.index_config import IndexConfig
from indexing.runtime.config import parse_overrides, resolve, to_yaml
from search.scan_config import ScanConfig


def test_layers_merge_in_order_and_types_are_parsed():
    cfg = resolve(
        ScanConfig,
        {"index": "a", "queries": "b", "out": "c", "k": 5},
        parse_overrides(
            ["k=20", "nprobe=64", "weights=null", "storage_options.endpoint_url=http://127.0.0.1:9"]
        ),
    )
    assert cfg.k == 20 and cfg.nprobe == 64 and cfg.weights is None
    assert cfg.storage_options == {"endpoint_url": "http://127.0.0.1:9"}
    assert yaml.safe_load(to_yaml(cfg))["k"] == 20


def test_string_fields_keep_what_was_typed():
    cfg = resolve(IndexConfig, parse_overrides(["shards=007.tar", "out=1e3"]))
    assert cfg.shards == "007.tar" and cfg.out == "1e3"


def test_every_problem_is_reported():
    with pytest.raises(CopyscanError) as err:
        resolve(ScanConfig, {"index": "a"}, parse_overrides(["k=ten", "bogus=1"]))
    text = str(err.value)
    assert (
        "bogus" in text and "k must be an integer" in text and "missing required key(s): queries, out" in text
    )


def test_validation():
    with pytest.raises(CopyscanError, match="mode"):
        resolve(IndexConfig, {"shards": "a", "out": "b", "mode": "append"})
    with pytest.raises(CopyscanError, match="candidates"):
        resolve(ScanConfig, {"index": "a", "queries": "b", "out": "c", "k": 10, "candidates": 5})
    with pytest.raises(CopyscanError, match="key=value"):
        parse_overrides(["k"])
