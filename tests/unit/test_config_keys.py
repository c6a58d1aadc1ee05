"""Every config key declared once (type, default, one-line help) and listed from that declaration: by
``copyscan CMD --help`` and by the README's key reference, which must not differ from it."""

import dataclasses
from pathlib import Path

import pytest

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.runtime.config import (
    default_text,
    key,
    key_rows,
    keys_markdown,
    keys_text,
    resolve,
    type_text,
)
from copyscan.jobs import cli
from copyscan.jobs._runtime import load_config_class

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted({job.config for job in cli.JOBS.values() if job.config})


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def test_every_job_that_takes_key_value_names_its_config():
    for name, job in cli.JOBS.items():
        assert bool(job.config) == job.config_arguments, name
    assert set(CONFIGS) == {config for config, _ in cli.key_sections().values()}


@pytest.mark.parametrize("config", CONFIGS)
def test_every_key_has_a_one_line_help(config):
    cls = load_config_class(config)
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    for f in dataclasses.fields(cls):
        help = f.metadata.get("help", "")
        assert help.strip() and "\n" not in help and len(help) <= 110, f"{cls.__name__}.{f.name}: {help!r}"


@pytest.mark.parametrize("config", CONFIGS)
def test_every_default_has_its_declared_type(config):
    """A default read back through resolve() is itself: ``max_gpus: float = 0`` would come back 0.0."""
    cls = load_config_class(config)
    required = {f.name: "x" for f in dataclasses.fields(cls) if _is_required(f)}
    for f in dataclasses.fields(cls):
        if _is_required(f):
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        value = getattr(resolve(cls, required, {f.name: default}), f.name)
        assert value == default and type(value) is type(default), f"{cls.__name__}.{f.name}"


def test_a_key_without_help_is_refused():
    for bad in ("", "  ", "two\nlines"):
        with pytest.raises(ValueError, match="one-line help"):
            key(1, bad)


def test_types_and_defaults_read_as_on_the_command_line():
    from copyscan.search.calibrate.config import CalibrateConfig
    from copyscan.search.report.config import ReportConfig
    from copyscan.search.scan_config import ScanConfig

    rows = {row.name: row for row in key_rows(ScanConfig)}
    assert list(rows) == [f.name for f in dataclasses.fields(ScanConfig)]
    assert rows["index"].default is None  # required
    assert (rows["k"].type, rows["k"].default, rows["k"].help) == ("int", "10", "results per query")
    assert (rows["threshold"].type, rows["threshold"].default) == ("str | float", "p90")
    assert (rows["partial_threshold"].default, rows["split_product"].default) == ('""', "false")
    assert (rows["weights"].type, rows["weights"].default) == ("str | None", "null")
    assert (rows["storage_options"].type, rows["storage_options"].default) == ("dict", "{}")
    report = {row.name: row for row in key_rows(ReportConfig)}
    assert (report["thresholds"].type, report["thresholds"].default) == ("tuple[float, ...]", "[0.5]")
    partial_scan = {row.name: row for row in key_rows(CalibrateConfig)}["partial_scan"].default
    assert partial_scan.startswith("{region_refine: 10, ") and "'0.5,0.4,0.45x0.3,0.3x0.45'" in partial_scan
    assert type_text(float | None) == "float | None" and type_text(list[int]) == "list[int]"
    assert default_text(64_000_000) == "64000000" and default_text(-1.0) == "-1.0"


def test_the_help_block_and_the_markdown_table_list_every_key():
    from copyscan.search.scan_config import ScanConfig

    text = keys_text(ScanConfig, {"index": "--index", "mode": "--mode"})
    assert "  index: str (required, or --index)\n      URL of a finished copyscan index" in text
    assert "  queries: str (required)\n" in text and "  mode: str = resume (or --mode)\n" in text
    assert "  threshold: str | float = p90\n" in text
    table = keys_markdown(ScanConfig).splitlines()
    assert table[:2] == ["| key | type | default | meaning |", "|---|---|---|---|"]
    assert len(table) == 2 + len(dataclasses.fields(ScanConfig))
    assert "| `threshold` | `str \\| float` | `p90` |" in "\n".join(table)
    assert "| `index` | `str` | required |" in table[2]
    assert "(query_id = \\_\\_key\\_\\_)" in "\n".join(table)  # not bold "key" in Markdown


def test_the_readme_key_reference_is_generated_from_the_declarations():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert cli.readme_keys(readme) == readme, (
        "README.md's Configuration keys differ from the config classes: run `make keys` "
        "(python -c 'from copyscan.jobs.cli import write_readme_keys; write_readme_keys(\"README.md\")')"
    )
    for section in cli.key_sections():
        assert f"<!-- keys:{section} -->\n| key | type | default | meaning |" in readme
    assert "](#configuration-keys)" in readme and "\n## Configuration keys\n" in readme


def test_the_readme_generator_rewrites_stale_tables_and_needs_every_section(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stale = readme.replace("| `k` | `int` | `10` | results per query |\n", "")
    assert stale != readme and cli.readme_keys(stale) == readme
    path = tmp_path / "README.md"
    path.write_text(stale, encoding="utf-8")
    assert cli.write_readme_keys(str(path)) is True and path.read_text(encoding="utf-8") == readme
    assert cli.write_readme_keys(str(path)) is False
    with pytest.raises(CopyscanError, match="keys:memorized"):
        cli.readme_keys(readme.replace("<!-- /keys:memorized -->", ""))
