"""Claiming an output location: resume an earlier run, overwrite it, or refuse a foreign folder.

A copyscan output is recognised by its resolved-config file (``index.yaml`` for an index, ``run.yaml``
for a scan), written first. ``resume`` requires the keys that shape the results to be unchanged;
``overwrite`` deletes the earlier copyscan output; a non-empty location without that file is never
written into, whatever the mode, so a typo cannot clobber someone else's data. The lease of the run
(``lease.py``: ``OUT/_lease.json``) is no output: it is neither a sign of a foreign folder nor removed by
``overwrite``; a resumed run removes the temporary files (``.NAME.tmp-PID``) a killed writer left.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import yaml

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import storage
from copyscan.indexing.store.lease import LEASE_NAME, Lease, hold_lease

logger = logging.getLogger("copyscan")

# what storage.write_bytes writes before moving into place: a leftover when its writer was killed
_TEMPORARY = re.compile(r"^\..+\.tmp-\d+$")


def claim_output(
    out: str,
    config_name: str,
    config: dict[str, Any],
    mode: str,
    resume_keys: Sequence[str],
    storage_options: storage.StorageOptions | None = None,
    absent: Mapping[str, Any] | None = None,
) -> bool:
    """Prepare ``out`` for a run with ``config``; returns True when an earlier run is being resumed.

    ``absent``: for resume keys added to copyscan after a run may have started, the value that run's
    behaviour had (a run that recorded no ``region_slide`` cut no sliding windows: ""), so it resumes under
    a newer copyscan when the setting still means the same. Writes ``out/config_name`` (the resolved
    config) before returning.
    """
    config_url = storage.join(out, config_name)
    existing = [u for u in storage.list_files(out, storage_options) if _name(u) != LEASE_NAME]
    resumed = False
    if existing:
        if not storage.exists(config_url, storage_options):
            raise foreign_output(out, config_name)
        previous = yaml.safe_load(storage.read_bytes(config_url, storage_options)) or {}
        if mode == "overwrite":
            _remove_all_but_lease(out, storage_options)
        else:
            absent = absent or {}
            before = {k: previous[k] if k in previous else absent.get(k) for k in resume_keys}
            changed = [k for k in resume_keys if _norm(before[k]) != _norm(config.get(k))]
            if changed:
                details = "; ".join(f"{k}: {before[k]!r} -> {config.get(k)!r}" for k in changed)
                raise CopyscanError(
                    f"{out} holds a run with different settings ({details}); resuming would mix them. "
                    f"Use mode=overwrite to replace it, or another output location."
                )
            resumed = True
            _remove_temporaries(out, existing, storage_options)
    # credentials are never written (to_dict redacts them already; this holds for any caller's dict), and
    # storage options are no resume key, so a redacted record compares as well as a full one
    record = storage.redact_config(config)
    storage.write_bytes(config_url, yaml.safe_dump(record, sort_keys=True).encode(), storage_options)
    return resumed


@contextmanager
def output_lease(
    out: str, job: str, config_name: str, storage_options: storage.StorageOptions | None = None
) -> Iterator[Lease]:
    """The lease on ``out`` for one run of ``job`` (``lease.hold_lease``), taken only after checking that
    ``out`` is not someone else's folder (no lease file is ever written there)."""
    refuse_foreign(out, config_name, storage_options)
    with hold_lease(out, job, storage_options) as lease:
        yield lease


def foreign_output(out: str, config_name: str) -> CopyscanError:
    return CopyscanError(
        f"{out} is not empty and holds no {config_name}: it was not written by copyscan "
        f"(or by this job). Choose an empty or new output location."
    )


def refuse_foreign(out: str, config_name: str, storage_options: storage.StorageOptions | None = None) -> None:
    """CopyscanError when ``out`` holds files but no ``config_name``: checked before anything (a lease) is
    written there. One listing of ``out`` itself, not of its tree."""
    if storage.exists(storage.join(out, config_name), storage_options):
        return
    fs, path = storage.get_fs(out, storage_options)
    if fs.exists(path) and any(_name(p) != LEASE_NAME for p in fs.ls(path, detail=False)):
        raise foreign_output(out, config_name)


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _remove_all_but_lease(out: str, storage_options: storage.StorageOptions | None) -> None:
    """mode=overwrite: every file and folder of ``out`` but the running job's lease."""
    fs, path = storage.get_fs(out, storage_options)
    doomed = [p for p in fs.ls(path, detail=False) if _name(p) != LEASE_NAME]
    if doomed:
        fs.rm(doomed, recursive=True)


def _remove_temporaries(
    out: str, existing: list[str], storage_options: storage.StorageOptions | None
) -> None:
    """The temporary files of writers killed by an earlier run (never read as results: readers skip names
    starting with a dot), removed so that a resumed output holds only finished files."""
    mine = f".tmp-{os.getpid()}"  # this run's own, in the making (the lease's heartbeat)
    leftovers = [u for u in existing if _TEMPORARY.match(_name(u)) and not u.endswith(mine)]
    if leftovers:
        fs, _ = storage.get_fs(out, storage_options)
        fs.rm([fs._strip_protocol(u) for u in leftovers])
        logger.info("%s: removed %d temporary file(s) of a killed run", out, len(leftovers))


def _norm(value: Any) -> Any:
    """``value`` as compared between runs: lists for tuples, and a number for the text of one, since keys
    that take a name or a number (``threshold``) were recorded as text before copyscan read numbers."""
    if isinstance(value, tuple):
        return [_norm(v) for v in value]
    if isinstance(value, list):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value
