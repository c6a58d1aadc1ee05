"""The lease of an output (``indexing/store/lease.py``) and how claiming an output treats it and the
temporary files of a killed writer (``indexing/store/outputs.py``), on local files."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import lease as lease_mod
from copyscan.indexing.store.lease import LEASE_NAME, acquire, read_lease
from copyscan.indexing.store.outputs import claim_output, output_lease


@pytest.fixture(autouse=True)
def _quick(monkeypatch):
    monkeypatch.setattr(lease_mod, "SETTLE_SECONDS", 0.01)
    monkeypatch.delenv(lease_mod.TIMEOUT_ENV, raising=False)


def _plant(out, **fields):
    """A lease of another run, as its holder would have written it."""
    record = {
        "job": "index",
        "token": "theirs",
        "host": "elsewhere",
        "machine": "elsewhere/boot/pid:[1]",
        "pid": 1,
        "pid_start": None,
        "started_at": time.time() - 600,
        "heartbeat_at": time.time(),
        "stale_after": 120,
        **fields,
    }
    out.mkdir(exist_ok=True)
    (out / LEASE_NAME).write_text(json.dumps(record))
    return record


def test_a_second_writer_is_refused_until_the_first_releases(tmp_path):
    out = tmp_path / "out"
    first = acquire(str(out), "index")
    held = read_lease(str(out))
    assert held["pid"] > 1 and held["machine"] == lease_mod.machine_id() and held["job"] == "index"
    with pytest.raises(
        CopyscanError, match=rf"is being written by another run: copyscan index \(host .*pid {held['pid']}\)"
    ):
        acquire(str(out), "scan")
    first.release()
    assert not (out / LEASE_NAME).exists()
    acquire(str(out), "scan").release()


def test_a_dead_local_holder_frees_the_lease_at_once(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    _plant(out, machine=lease_mod.machine_id(), pid=dead.pid, heartbeat_at=time.time())
    lease = acquire(str(out), "scan")
    assert read_lease(str(out))["token"] == lease.record["token"]
    lease.release()


def test_another_machines_lease_is_free_only_after_the_timeout(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _plant(out, heartbeat_at=time.time() - 60)  # alive by its heartbeat: its pid means nothing here
    with pytest.raises(CopyscanError, match="120 s after its last heartbeat"):
        acquire(str(out), "index")
    _plant(out, heartbeat_at=time.time() - 121)
    acquire(str(out), "index").release()
    _plant(out)  # a fresh heartbeat, taken over by a user who knows its run is dead
    monkeypatch.setenv(lease_mod.TIMEOUT_ENV, "0")
    acquire(str(out), "index").release()
    monkeypatch.setenv(lease_mod.TIMEOUT_ENV, "soon")
    with pytest.raises(CopyscanError, match="COPYSCAN_LEASE_TIMEOUT='soon' is not a number"):
        acquire(str(out), "index")


def test_the_heartbeat_renews_the_lease_and_notices_a_takeover(tmp_path, monkeypatch):
    monkeypatch.setenv(lease_mod.TIMEOUT_ENV, "4")  # a heartbeat a second
    out = tmp_path / "out"
    lease = acquire(str(out), "scan")
    first = read_lease(str(out))["heartbeat_at"]
    time.sleep(1.6)
    assert read_lease(str(out))["heartbeat_at"] > first
    lease.check()
    _plant(out)
    time.sleep(1.6)
    with pytest.raises(CopyscanError, match="taken over by copyscan index .host elsewhere"):
        lease.check()
    lease.release()
    assert read_lease(str(out))["token"] == "theirs"  # not removed: it is no longer this run's


def test_claiming_keeps_the_lease_and_clears_a_killed_writers_temporaries(tmp_path):
    out = tmp_path / "out"
    config = {"a": 1}
    with output_lease(str(out), "index", "index.yaml"):
        assert claim_output(str(out), "index.yaml", config, "resume", ["a"]) is False
        (out / "matches").mkdir()
        (out / "matches" / ".part-00000.parquet.tmp-123").write_bytes(b"half")
        (out / "matches" / "part-00001.parquet").write_bytes(b"done")
        assert claim_output(str(out), "index.yaml", config, "resume", ["a"]) is True
        assert sorted(p.name for p in (out / "matches").iterdir()) == ["part-00001.parquet"]
        assert claim_output(str(out), "index.yaml", config, "overwrite", ["a"]) is False
        assert sorted(p.name for p in out.iterdir()) == [LEASE_NAME, "index.yaml"]
    assert sorted(p.name for p in out.iterdir()) == ["index.yaml"]


def test_no_lease_is_written_into_a_foreign_folder(tmp_path):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    with pytest.raises(CopyscanError, match="not written by copyscan"):
        with output_lease(str(foreign), "index", "index.yaml"):
            pass
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]


def test_memorized_and_generate_are_refused_while_another_run_holds_their_output(tmp_path):
    """Every job that writes a run folder takes its lease first: a second writer stops before any work."""
    from copyscan.indexing.runtime.config import resolve
    from copyscan.search.generate.config import GenerateConfig
    from copyscan.search.generate.generate_ray import run_generate
    from copyscan.search.memorized.config import MemorizedConfig
    from copyscan.search.memorized.memorized_ray import run_memorized

    mem_out, gen_out = tmp_path / "mem", tmp_path / "gen"
    for out, job in ((mem_out, "memorized"), (gen_out, "generate")):
        _plant(out, job=job)
    mem = resolve(MemorizedConfig, {"generations": str(tmp_path / "none"), "out": str(mem_out)})
    with pytest.raises(CopyscanError, match="memorized.*elsewhere|elsewhere.*memorized"):
        run_memorized(mem)
    gen = resolve(
        GenerateConfig, {"checkpoint": str(tmp_path / "none"), "prompts": "p.txt", "out": str(gen_out)}
    )
    with pytest.raises(CopyscanError, match="generate.*elsewhere|elsewhere.*generate"):
        run_generate(gen)
    assert sorted(p.name for p in mem_out.iterdir()) == [LEASE_NAME]  # nothing written beside the lease
