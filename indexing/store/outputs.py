"""Claiming an output location: resume an earlier run, overwrite it, or refuse a foreign folder.

A copyscan output is recognised by its resolved-config file (``index.yaml`` for an index, ``run.yaml``
for a scan), written first. ``resume`` requires the keys that shape the results to be unchanged;
``overwrite`` deletes the earlier copyscan output; a non-empty location without that file is never
written into, whatever the mode, so a typo cannot clobber someone else's data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import storage


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
    existing = storage.list_files(out, storage_options)
    resumed = False
    if existing:
        if not storage.exists(config_url, storage_options):
            raise CopyscanError(
                f"{out} is not empty and holds no {config_name}: it was not written by copyscan "
                f"(or by this job). Choose an empty or new output location."
            )
        previous = yaml.safe_load(storage.read_bytes(config_url, storage_options)) or {}
        if mode == "overwrite":
            storage.remove(out, storage_options, recursive=True)
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
    # credentials are never written (to_dict redacts them already; this holds for any caller's dict), and
    # storage options are no resume key, so a redacted record compares as well as a full one
    record = storage.redact_config(config)
    storage.write_bytes(config_url, yaml.safe_dump(record, sort_keys=True).encode(), storage_options)
    return resumed


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
