"""A full disk, a refused permission or a bad path while writing an output: a CopyscanError naming the path,
and nothing half-written left under the final name (nor a temporary file).

These run as root (CI) as well as a normal user, where permission bits stop no one and a read-only mount
may be unavailable: the disk is "full" in a forked child whose file size limit (``RLIMIT_FSIZE``, with
``SIGXFSZ`` ignored) makes every write past it fail with EFBIG, as ENOSPC would; permission is refused in a
forked child that, when root, becomes ``nobody`` first.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import storage


def _in_child(work: Callable[[], None]) -> str:
    """Run ``work`` in a forked child; what it raised as a CopyscanError ('' if nothing), or a failure."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        status = 0
        try:
            work()
        except CopyscanError as exc:
            os.write(write, str(exc).encode())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(write, f"UNEXPECTED {type(exc).__name__}: {exc}".encode())
            status = 1
        os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, message
    return message


def _full_disk(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_full_disk_is_an_error_naming_the_path_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    small, big = str(out / "small.json"), str(out / "shard-00001.index")
    local = tmp_path / "local.bin"
    local.write_bytes(os.urandom(100_000))

    def work() -> None:
        _full_disk(8192)
        storage.write_bytes(small, b"{}")  # under the limit: written
        try:
            storage.upload_file(str(local), str(out / "uploaded.bin"))
        except CopyscanError as exc:
            assert "uploaded.bin" in str(exc), exc
        else:
            raise AssertionError("upload_file past the limit did not fail")
        storage.write_bytes(big, os.urandom(100_000))

    message = _in_child(work)
    assert message.startswith(f"cannot write {big}: file too large"), message
    assert sorted(p.name for p in out.iterdir()) == ["small.json"]  # no half file, no .tmp-*


def test_a_path_through_a_file_is_an_error_naming_the_path(tmp_path):
    (tmp_path / "out").write_text("a file where a folder should be")
    url = str(tmp_path / "out" / "chunks" / "chunk_00000.json")
    with pytest.raises(CopyscanError, match=f"cannot write {url}: a parent of the path is not a folder"):
        storage.write_json(url, {"done": True})
    url = str(tmp_path / "out" / "chunk_00000.json")  # the parent itself is the file
    with pytest.raises(CopyscanError, match=f"cannot write {url}: a parent of the path is not a folder"):
        storage.write_json(url, {"done": True})


def test_permission_denied_is_an_error_naming_the_path():
    folder = Path(tempfile.mkdtemp(prefix="copyscan-readonly-", dir="/tmp"))
    try:
        os.chmod(folder, 0o555)
        url = str(folder / "run" / "summary.json")

        def work() -> None:
            if os.geteuid() == 0:  # root writes anywhere: become nobody
                os.setgid(65534)
                os.setuid(65534)
            storage.write_json(url, {"done": True})

        message = _in_child(work)
        assert message.startswith(f"cannot write {url}: permission denied"), message
        assert list(folder.iterdir()) == []
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(folder)


def test_a_folder_at_the_output_name_is_an_error_not_a_move_into_it(tmp_path):
    """A rename onto a folder fails (os.replace) instead of moving the file inside it (shutil.move)."""
    target = tmp_path / "manifest.json"
    target.mkdir()
    with pytest.raises(CopyscanError, match="manifest.json: the path is a folder"):
        storage.write_json(str(target), {"a": 1})
    assert list(target.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
