"""Tars with hostile members, for the unit and the integration tests (imported by name: pytest puts tests/,
the folder of the root conftest.py, on sys.path)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image


def png(seed: int = 0, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def hostile_shard(path) -> None:
    """One tar with every kind of hostile member, each its own sample, and good samples between them."""
    meta = json.dumps({"url": "http://x/good"}).encode()
    with tarfile.open(path, "w") as tar:
        add_member(tar, "good0.png", png(0))
        add_member(tar, "good0.txt", b"a caption")
        add_member(tar, "good0.json", meta)
        add_member(tar, "../../escape.png", png(1))
        add_member(tar, "/etc/absolute.png", png(2))
        add_member(tar, "sub/../../up.png", png(3))
        add_member(tar, "link.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add_member(tar, "hard.png", type=tarfile.LNKTYPE, linkname="good0.png")
        add_member(tar, "fifo.png", type=tarfile.FIFOTYPE)
        add_member(tar, "good0.png", png(4))  # the key again, later in the shard
        add_member(tar, "onlytext.txt", b"a caption and no image")
        add_member(tar, "nojson.png", png(5))  # no .json: fine
        add_member(tar, "latin1.png", png(6))
        add_member(tar, "latin1.txt", "café crème".encode("latin-1"))  # not UTF-8
        add_member(tar, "latin1.json", '{"caption": "café"}'.encode("latin-1"))
        add_member(tar, "twice.png", png(7))
        add_member(tar, "twice.png", png(8))  # the same member name twice in a row
        add_member(tar, "NOEXTENSION", b"data")
        add_member(tar, "ctrl\x01name.png", png(9))
