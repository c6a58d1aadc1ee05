import pytest
import yaml

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.index_config import IndexConfig
from copyscan.indexing.runtime.config import parse_overrides, resolve, to_yaml
from copyscan.search.scan_config import ScanConfig


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
    # embed_concurrency: 0 (the default) follows the measured rates, N fixes it, below 0 is refused
    assert resolve(IndexConfig, {"shards": "a", "out": "b"}).embed_concurrency == 0
    assert resolve(ScanConfig, {**SCAN, "embed_concurrency": 3}).embed_concurrency == 3
    for config, required in ((IndexConfig, {"shards": "a", "out": "b"}), (ScanConfig, SCAN)):
        with pytest.raises(CopyscanError, match=r"embed_concurrency must be >= 0 \(0 = from the measured"):
            resolve(config, {**required, "embed_concurrency": -1})


SCAN = {"index": "i", "queries": "q", "out": "o"}


def test_a_name_or_a_number_is_a_float_when_it_is_a_number():
    """``str | float`` keys: a number on the command line or in the file is a float, a name stays text."""
    for raw, want in (("0.5", 0.5), ("0", 0.0), ("-0.25", -0.25), ("1e-3", 0.001), (".5", 0.5)):
        cfg = resolve(ScanConfig, SCAN, parse_overrides([f"threshold={raw}", f"radius={raw}"]))
        assert type(cfg.threshold) is float and cfg.threshold == want and cfg.radius == want
    cfg = resolve(ScanConfig, SCAN, {"threshold": 0.25, "partial_threshold": 1, "radius": "0.3"})  # YAML
    assert (cfg.threshold, cfg.partial_threshold, cfg.radius) == (0.25, 1.0, 0.3)
    assert type(cfg.partial_threshold) is float
    cfg = resolve(ScanConfig, SCAN, parse_overrides(["threshold=p99", "radius=", "partial_threshold=none"]))
    assert (cfg.threshold, cfg.radius, cfg.partial_threshold) == ("p99", "", "none")
    # str | None: null is None, anything else the text as typed; float | None: a number or null
    cfg = resolve(
        IndexConfig,
        {"shards": "a", "out": "b"},
        parse_overrides(["weights=007", "whitening_pca_shrinkage=null"]),
    )
    assert cfg.weights == "007" and cfg.whitening_pca_shrinkage is None
    cfg = resolve(
        IndexConfig,
        {"shards": "a", "out": "b"},
        parse_overrides(["weights=null", "whitening_pca_shrinkage=0.2"]),
    )
    assert cfg.weights is None and cfg.whitening_pca_shrinkage == 0.2


def test_threshold_names_are_checked_before_any_index_is_read():
    for override, message in (
        ("threshold=p95", "threshold must be p90, p99, somepalli, duplicate, none or a score_norm value"),
        ("threshold=nan", "threshold must be"),
        ("radius=duplicate", "radius is a score_norm threshold"),
        ("radius=p95", "radius must be p90, p99 or a score_norm value"),
        ("partial_threshold=somepalli", "partial_threshold must be p90, p99, none"),
    ):
        with pytest.raises(CopyscanError, match=message):
            resolve(ScanConfig, SCAN, parse_overrides([override]))  # "i" is no index: nothing is read
    for ok in (
        "threshold=somepalli",
        "threshold=duplicate",
        "threshold=none",
        "radius=p99",
        "partial_threshold=0.4",
    ):
        resolve(ScanConfig, SCAN, parse_overrides([ok]))


def test_bad_types_and_bad_values_are_reported_together():
    with pytest.raises(CopyscanError) as err:
        resolve(
            ScanConfig,
            {"index": "i"},
            parse_overrides(
                [
                    "k=ten",
                    "nprobes=3",
                    "threshold=p95",
                    "verify_fit=stretch",
                    "radius=somepalli",
                    "regions=maybe",
                ]
            ),
        )
    text = str(err.value)
    for part in (
        "unknown key nprobes (did you mean nprobe?)",
        "k must be an integer, got 'ten'",
        "missing required key(s): queries, out",
        "threshold must be p90",
        "verify_fit must be crop or squash",
        "radius is a score_norm threshold",
        "regions must be auto, on or off",
    ):
        assert part in text, part
    assert text.count("\n  - ") == 7  # one problem a line


def test_every_config_checks_its_values_without_its_required_keys():
    """resolve() runs a config's problems() with its missing required keys as None: none may read them."""
    from copyscan.jobs._runtime import load_config_class
    from copyscan.jobs.cli import JOBS

    for config in {job.config for job in JOBS.values() if job.config}:
        cls = load_config_class(config)
        with pytest.raises(CopyscanError, match="missing required key"):
            resolve(cls, {})


def test_a_resolved_config_resolves_back_from_its_yaml():
    """The config written next to a run's outputs reproduces it: types survive the round trip."""
    cfg = resolve(ScanConfig, SCAN, parse_overrides(["threshold=0.5", "radius=p90", "storage_options.a=1"]))
    again = resolve(ScanConfig, yaml.safe_load(to_yaml(cfg)))
    assert again == cfg and type(again.threshold) is float


def test_a_number_threshold_is_a_score_norm_value_downstream():
    """A float threshold, radius or partial threshold means what the same text did: score_norm >= it."""
    from copyscan.search.calibrate.thresholds import resolve_partial_threshold, resolve_threshold

    cfg = resolve(
        ScanConfig, SCAN, parse_overrides(["threshold=0.5", "radius=0.25", "partial_threshold=0.75"])
    )
    given = {"name": "0.5", "column": "score_norm", "value": 0.5, "source": "given"}
    assert resolve_threshold({}, cfg.threshold) == given
    assert resolve_threshold({}, cfg.radius)["value"] == 0.25
    partial, why = resolve_partial_threshold({}, cfg, regions=True)
    assert partial["value"] == 0.75 and partial["column"] == "local_score_norm" and why is None
