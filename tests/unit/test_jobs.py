"""The job runner: one declaration per job gives ``copyscan CMD`` and ``python -m copyscan.jobs.CMD`` the same
flags, exit statuses (2 for a CopyscanError, the body's own otherwise) and Ray start-up."""

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from copyscan.indexing.errors import CopyscanError
from copyscan.jobs import _runtime, cli

ROOT = Path(__file__).resolve().parents[2]
RAY_JOBS = {
    "index",
    "scan",
    "nightly",
    "memorized",
    "generate",
}  # the others run in the driver (calibrate: partial=N only)


def test_every_job_module_declares_its_copyscan_command():
    modules = sorted(p.stem for p in (ROOT / "jobs").glob("*.py") if not p.stem.startswith("_")) + ["demo"]
    modules.remove("cli")
    assert sorted(cli.JOBS) == sorted(modules)
    for name in modules:
        job = importlib.import_module(f"copyscan.jobs.{name}").JOB
        assert cli.JOBS[name] is job and job.name == name and job.description
    assert {name for name, job in cli.JOBS.items() if job.uses_ray} == RAY_JOBS


def _job(body, uses_ray=False):
    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--flag")

    return _runtime.Job("probe", "a probe", "A probe job.", arguments, body, uses_ray=uses_ray)


def test_runner_exit_statuses_and_error_message(capsys):
    def fails(args):
        raise CopyscanError(f"bad flag {args.flag}")

    assert _job(fails).main(["--flag", "x"]) == 2
    assert "copyscan: error: bad flag x" in capsys.readouterr().err
    assert _job(lambda args: 3).main([]) == 3  # a job's own status (nightly's regression)
    assert _job(lambda args: None).main(["k=1"]) == 0
    with pytest.raises(ValueError):  # anything but a CopyscanError is a bug: it propagates
        _job(lambda args: int("x")).main([])


def test_runner_starts_ray_before_the_body_only_when_declared(monkeypatch):
    calls = []
    monkeypatch.setattr(
        _runtime, "init_ray", lambda address, num_cpus: calls.append(("ray", address, num_cpus))
    )

    def body(args):
        calls.append(("body", args.overrides))

    assert _job(body, uses_ray=True).main(["--ray-address", "ray://h:1", "--num-cpus", "2", "k=1"]) == 0
    assert _job(body).main([]) == 0
    assert calls == [("ray", "ray://h:1", 2), ("body", ["k=1"]), ("body", [])]


def test_copyscan_runs_the_job_it_names(capsys):
    assert cli.main(["query", "only-a-run"]) == 2  # the query job's own check: no SQL given
    assert "then the SQL" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["query", "--no-such-flag", "a", "b"])


def test_copyscan_help_runs_without_loading_a_library():
    """``python -m copyscan.jobs.cli --help`` (the ``copyscan`` script) lists every command; declaring them
    imports no config module, so neither torch nor faiss (``-X importtime`` names every module imported)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "copyscan.jobs.cli", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in cli.JOBS) and "90%/99%" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "copyscan.jobs.scan" in imported and not imported & {"torch", "faiss", "ray", "pyarrow"}


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        cli.parser().parse_args(argv)
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(cli.JOBS))
def test_every_command_help_lists_its_keys(name, capsys):
    """``copyscan CMD --help``: the job's flags, then each key of its config with type, default and help."""
    import dataclasses

    job = cli.JOBS[name]
    text = _help([name, "--help"], capsys)
    assert text.startswith(f"usage: copyscan {name}") and "e.g. k=20" not in text
    cls = job.config_class()
    if cls is None:
        assert "Keys:" not in text
        return
    keys = text[text.index("\nKeys: key=value") :]
    for f in dataclasses.fields(cls):
        line = next((x for x in keys.splitlines() if x.startswith(f"  {f.name}: ")), None)
        assert line is not None, f"{name} --help does not list {f.name}"
        assert keys.splitlines()[keys.splitlines().index(line) + 1].strip() == f.metadata["help"]


def test_help_names_the_flags_that_set_a_key(capsys):
    assert "  index: str (required, or --index)\n" in _help(["scan", "--help"], capsys)
    assert "  run: str (required, or RUN)\n" in _help(["report", "--help"], capsys)
    assert "  mode: str = resume (or --mode)\n" in _help(["memorized", "--help"], capsys)
    top = _help(["--help"], capsys)
    assert all(f"    {name}" in top for name in cli.JOBS) and "copyscan COMMAND --help" in top


def test_python_m_job_help_lists_the_same_keys(capsys):
    """``python -m copyscan.jobs.merge --help`` (``ray job submit``) is the same parser as ``copyscan merge
    --help``."""
    from copyscan.jobs import merge

    with pytest.raises(SystemExit):
        merge.JOB.main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m copyscan.jobs.merge")
    assert text.split("\nKeys:", 1)[1] == _help(["merge", "--help"], capsys).split("\nKeys:", 1)[1]


def test_submit_exits_with_the_entrypoints_own_status():
    from copyscan.jobs.submit import exit_status

    assert exit_status("SUCCEEDED", None) == 0
    message = (
        "Job entrypoint command failed with exit code 3, last available logs (truncated to 20,000 chars):"
    )
    assert exit_status("FAILED", message) == 3  # nightly's regression, told apart from a crash
    assert exit_status("FAILED", "Job entrypoint command failed with exit code 2") == 2
    assert exit_status("FAILED", "Job supervisor actor died") == 1
    assert exit_status("STOPPED", None) == 1
