"""Demo and test data made the way a real user makes it: LAION-format shards and "generated" images.

Training shards come from img2dataset itself, downloading real images from a loopback HTTP server, so the
tars, per-shard parquets and ``*_stats.json`` files are exactly what a LAION download leaves (failed rows
included). The generated images are transformed copies of some training images
(``copyscan.indexing.embed.augment``) mixed with images that are not in the training set, with the ground
truth written next to them.

img2dataset runs in a child Python process (see ``run_img2dataset`` for why). Nothing here calls
``ray.init``.

What img2dataset writes per shard ``NNNNN`` (``oom_shard_count=5``), checked by tests/integration:

- ``NNNNN.tar``: ``{key}.jpg`` + ``{key}.txt`` (caption) + ``{key}.json`` (the row's saved columns plus
  ``key, status, error_message, width, height, original_width, original_height, exif, sha256``) for every
  sample that succeeded, and nothing for the others.
- ``NNNNN.parquet``: one row per input row, failed ones included, with ``status`` ``success``,
  ``failed_to_download`` (404, connection refused, timeout: ``error_message`` e.g. ``HTTP Error 404: File
  not found``) or ``failed_to_resize`` (bytes that do not decode: ``Image decoding error``).
- ``NNNNN_stats.json``, written last: ``count, successes, failed_to_download, failed_to_resize`` and a
  ``status_dict`` counting each error message. It is img2dataset's resume marker.

Keys are ``{shard:05d}{row:0Nd}`` with N = ceil(log10(number_sample_per_shard)), in the order of the
url list; a failed row leaves a gap in the keys of its tar. Samples are written in the order downloads
finish, so neither the tar members nor the parquet rows are sorted by key. A truncated JPEG is a failure
(OpenCV 4.14 returns no image for it): ``failed_to_resize``, ``Image decoding error``, like a non-image.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from copyscan.indexing.errors import CopyscanError

# The additional metadata column saved by img2dataset into every sample's .json and the shard parquet.
SOURCE_ID_COLUMN = "source_id"
OOM_SHARD_COUNT = 5  # img2dataset's default: shard names 00000 .. 99999
GENERATED_JPEG_QUALITY = 90


# ---------------------------------------------------------------------------------------------------------
# Serving files over loopback HTTP


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-response (img2dataset's timeout) is not our error; stay quiet.
        pass


@contextmanager
def serve_directory(root: str | os.PathLike) -> Iterator[str]:
    """Serve the files under ``root`` at ``http://127.0.0.1:<free port>`` while the context is open.

    Yields the base URL (no trailing slash). A missing file answers 404. The server runs in a daemon
    thread, logs nothing, and is shut down and its socket closed on exit.
    """
    root = Path(root)
    if not root.is_dir():
        raise CopyscanError(f"cannot serve {root}: not a directory")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = _QuietServer(("127.0.0.1", 0), handler)
    # A short poll interval: shutdown() waits up to one interval.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"http-{root.name}", daemon=True
    )
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# ---------------------------------------------------------------------------------------------------------
# A LAION-like metadata file


def caption_for(path: str | os.PathLike) -> str:
    """A deterministic caption from the file name: ``00007_konrad-elvish-glad.png`` → ``a painting of konrad elvish glad``."""
    stem = Path(path).stem
    words = [w for w in re.split(r"[^A-Za-z0-9]+", stem) if w and not w.isdigit()]
    return "a painting of " + (" ".join(words).lower() or "something")


def stage_images(images: Sequence[Path], folder: str | os.PathLike) -> list[Path]:
    """Copy ``images`` into ``folder`` as ``{i:05d}_{name}`` (unique, ordered names); returns the copies.

    Source packages reuse file names (every campaign has a ``konrad.png``), so files are renamed before
    they are served from one folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staged = []
    for i, image in enumerate(images):
        target = folder / f"{i:05d}_{Path(image).name}"
        shutil.copyfile(image, target)
        staged.append(target)
    return staged


def write_url_list(
    images: Sequence[Path],
    base_url: str,
    out_path: str,
    captions: Sequence[str] | None = None,
    *,
    root: str | os.PathLike | None = None,
    extra_columns: Mapping[str, Sequence[Any]] | None = None,
) -> str:
    """Write a LAION-style metadata parquet for ``images`` served under ``base_url``; returns ``out_path``.

    Columns (one row per image, in the given order): ``url`` (``base_url`` + the path relative to
    ``root``, percent-encoded), ``caption`` (``captions[i]``, default ``caption_for(image)``) and
    ``source_id`` (the POSIX path relative to ``root``: stable, and unique within the list).
    ``root`` defaults to the images' common folder. ``images`` need not exist: a missing one is a 404
    row, which is how tests plant failed downloads. ``out_path`` is any fsspec URL. ``extra_columns``: more
    columns of one value per image, as LAION's parquets have (``LICENSE``, ``pwatermark``, ``punsafe``,
    ``similarity``): ``run_img2dataset`` keeps them in each sample's .json.
    """
    import pyarrow as pa

    from copyscan.indexing.store import storage

    if not images:
        raise CopyscanError("write_url_list: no images given")
    if captions is not None and len(captions) != len(images):
        raise CopyscanError(f"write_url_list: {len(images)} images but {len(captions)} captions")
    paths = [Path(p).absolute() for p in images]
    base = Path(root).absolute() if root is not None else Path(os.path.commonpath([p.parent for p in paths]))
    source_ids = []
    for path in paths:
        try:
            source_ids.append(path.relative_to(base).as_posix())
        except ValueError:
            raise CopyscanError(f"{path} is not under the served root {base}") from None
    if len(set(source_ids)) != len(source_ids):
        raise CopyscanError("write_url_list: the same image is listed twice")
    extra = dict(extra_columns or {})
    for name, values in extra.items():
        if name in ("url", "caption", SOURCE_ID_COLUMN) or len(values) != len(images):
            raise CopyscanError(
                f"write_url_list: extra column {name!r} must be new and hold one value per image"
            )
    urls = [base_url.rstrip("/") + "/" + urllib.parse.quote(sid) for sid in source_ids]
    table = pa.table(
        {
            "url": urls,
            "caption": list(captions) if captions is not None else [caption_for(p) for p in paths],
            SOURCE_ID_COLUMN: source_ids,
            **{name: list(values) for name, values in extra.items()},
        }
    )
    storage.write_parquet(out_path, table)
    return out_path


# ---------------------------------------------------------------------------------------------------------
# img2dataset

# Runs in the child process; arguments arrive as JSON on stdin.
_CHILD = """
import json, sys
import img2dataset
img2dataset.download(**json.load(sys.stdin))
"""

# Environment of the child: img2dataset's albumentations import checks PyPI for updates unless told not to;
# wandb is imported (never initialised) by img2dataset.logger.
CHILD_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}


def run_img2dataset(
    url_list: str,
    output_folder: str,
    *,
    image_size: int = 384,
    number_sample_per_shard: int = 10_000,
    processes_count: int = 1,
    thread_count: int = 16,
    incremental_mode: str = "incremental",
    timeout_s: float = 600.0,
    extra_options: dict[str, Any] | None = None,
) -> list[str]:
    """Download the rows of ``url_list`` (a parquet from ``write_url_list``) into webdataset shards.

    Options are those of a LAION download: webdataset output, ``resize_mode="keep_ratio"`` with
    ``resize_only_if_bigger`` (the shorter side is brought down to ``image_size``, never up), JPEG
    quality 95, sha256 and EXIF kept, ``source_id`` and every other column of the list but url and caption
    (LAION's ``LICENSE``, ``pwatermark``, ...) saved in each sample's .json. ``output_folder`` is any
    fsspec URL; for ``s3://`` the child reads credentials and ``AWS_ENDPOINT_URL_S3`` from the environment.
    ``incremental_mode``: img2dataset's own — ``"incremental"`` skips shards whose ``*_stats.json``
    exists (resume), ``"overwrite"`` empties the folder first.

    ``processes_count=1`` suits small runs: each img2dataset process (and its logger process) spends
    ~4 s of CPU importing torch, albumentations and wandb; on 2 cores 60 images take ~17 s with one
    process and ~23 s with two. ``timeout_s`` bounds the whole run (the child is killed with its pool).

    img2dataset runs in a child Python process because, in-process, it replaces the caller's SIGINT
    handler (and fails outside the main thread), its "spawn" pool re-imports the caller's ``__main__``,
    and it prints progress from every process. Its output is captured and shown only on failure.

    Returns the sorted URLs of the shard tars (with the protocol of ``output_folder``). Raises
    CopyscanError when the child fails or a shard has no ``_stats.json`` (img2dataset reports shard
    failures only by printing them).
    """
    from copyscan.indexing.store import storage

    rows, columns = _count_rows(url_list)
    params: dict[str, Any] = {
        "url_list": url_list,
        "output_folder": output_folder,
        "input_format": "parquet",
        "url_col": "url",
        "caption_col": "caption",
        "save_additional_columns": [c for c in columns if c not in ("url", "caption")],
        "output_format": "webdataset",
        "image_size": image_size,
        "resize_mode": "keep_ratio",
        "resize_only_if_bigger": True,
        "encode_format": "jpg",
        "encode_quality": 95,
        "number_sample_per_shard": number_sample_per_shard,
        "oom_shard_count": OOM_SHARD_COUNT,
        "processes_count": processes_count,
        "thread_count": thread_count,
        "distributor": "multiprocessing",
        "incremental_mode": incremental_mode,
        "retries": 0,
        "timeout": 10,
        "enable_wandb": False,
        "compute_hash": "sha256",
    }
    params.update(extra_options or {})
    # img2dataset imports wandb, which leaves temp folders behind: give the child a temp dir we remove.
    with (
        tempfile.TemporaryDirectory(prefix="copyscan-img2dataset-") as child_tmp,
        tempfile.TemporaryFile(mode="w+b") as log,
    ):
        env = {**os.environ, **CHILD_ENV, "TMPDIR": child_tmp, "WANDB_DIR": child_tmp}
        # Its own session, so a timeout or Ctrl-C also ends img2dataset's pool and logger processes.
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            child.communicate(json.dumps(params).encode(), timeout=timeout_s)
            status = f"exit status {child.returncode}"
        except subprocess.TimeoutExpired:
            _kill_group(child)
            status = f"killed after {timeout_s:g} s"
        except BaseException:
            _kill_group(child)
            raise
        log.seek(0)
        output = log.read().decode("utf-8", errors="replace")
    expected = math.ceil(rows / number_sample_per_shard)
    names = [f"{shard:0{OOM_SHARD_COUNT}d}" for shard in range(expected)]
    missing = [n for n in names if not storage.exists(storage.join(output_folder, f"{n}_stats.json"))]
    if status != "exit status 0" or missing:
        raise CopyscanError(
            f"img2dataset into {output_folder} failed ({status}); "
            f"shards without _stats.json: {missing or 'none'}. Rerun to resume. Its output ends with:\n"
            + _tail(output)
        )
    return [storage.join(output_folder, f"{n}.tar") for n in names]


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def _count_rows(url_list: str) -> tuple[int, list[str]]:
    """The rows and the column names of ``url_list``."""
    import pyarrow.parquet as pq

    from copyscan.indexing.store import storage

    fs, path = storage.get_fs(url_list)
    if fs.isdir(path):
        raise CopyscanError(f"run_img2dataset takes one parquet file, not a folder: {url_list}")
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        return parquet.metadata.num_rows, parquet.schema_arrow.names


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def read_shard_stats(output_folder: str) -> dict[str, dict[str, Any]]:
    """img2dataset's ``{shard}_stats.json`` files under ``output_folder``, by shard name (``"00000"``)."""
    from copyscan.indexing.store import storage

    stats = {}
    for url in storage.list_files(output_folder):
        name = url.rsplit("/", 1)[1]
        if name.endswith("_stats.json"):
            stats[name[: -len("_stats.json")]] = storage.read_json(url)
    return stats


def source_keys(output_folder: str) -> dict[str, str]:
    """``source_id`` → img2dataset key of every successfully downloaded row, from the shard parquets."""
    import pyarrow.parquet as pq

    from copyscan.indexing.store import storage

    mapping = {}
    for url in storage.list_files(output_folder):
        if not url.endswith(".parquet"):
            continue
        fs, path = storage.get_fs(url)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=[SOURCE_ID_COLUMN, "key", "status"]).to_pylist()
        mapping.update({row[SOURCE_ID_COLUMN]: row["key"] for row in table if row["status"] == "success"})
    return mapping


# ---------------------------------------------------------------------------------------------------------
# "Generated" images with planted copies


def make_generated_images(
    train_images: Sequence[Path],
    other_images: Sequence[Path],
    out_dir: str,
    *,
    n_copies: int,
    n_unrelated: int,
    seed: int,
    augment: Callable[[Image.Image, np.random.Generator], Image.Image] | None = None,
) -> list[dict]:
    """Write ``n_copies + n_unrelated`` query images ``gen_{i:05d}.jpg`` into the local folder ``out_dir``.

    ``n_copies`` are ``augment``-ed copies of distinct images drawn from ``train_images``; ``n_unrelated``
    are the same transformation applied to distinct images from ``other_images`` (which must not be
    in the training set), so only the source tells them apart. Copies and unrelated images are shuffled
    together. ``augment`` defaults to ``copyscan.indexing.embed.augment.copy_augment``; query i gets its own
    generator seeded by ``(seed, i)``. Images are read as RGB with transparency on white, saved as JPEG
    quality 90.

    Returns the ground truth, one dict per query in id order: ``query_id`` (``gen_00007``), ``file``,
    ``is_copy`` and ``source_image`` (the training image's path as str, or None), also written as
    ``out_dir/ground_truth.json``. The same arguments give byte-identical files.
    """
    from copyscan.indexing.read.images import open_rgb

    if augment is None:
        from copyscan.indexing.embed.augment import copy_augment as augment
    if n_copies > len(train_images) or n_unrelated > len(other_images):
        raise CopyscanError(
            f"asked for {n_copies} copies of {len(train_images)} training images and "
            f"{n_unrelated} unrelated images from {len(other_images)} others"
        )
    overlap = {Path(p).resolve() for p in train_images} & {Path(p).resolve() for p in other_images}
    if overlap:
        raise CopyscanError(f"{len(overlap)} 'other' images are training images, e.g. {sorted(overlap)[0]}")
    rng = np.random.default_rng(seed)
    sources = [
        (True, Path(train_images[i])) for i in sorted(rng.choice(len(train_images), n_copies, replace=False))
    ]
    sources += [
        (False, Path(other_images[i]))
        for i in sorted(rng.choice(len(other_images), n_unrelated, replace=False))
    ]
    order = rng.permutation(len(sources))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    truth = []
    for i, j in enumerate(order):
        is_copy, source = sources[j]
        query_id = f"gen_{i:05d}"
        generated = augment(open_rgb(source), np.random.default_rng([seed, i])).convert("RGB")
        generated.save(out / f"{query_id}.jpg", format="JPEG", quality=GENERATED_JPEG_QUALITY)
        truth.append(
            {
                "query_id": query_id,
                "file": f"{query_id}.jpg",
                "is_copy": is_copy,
                "source_image": str(source) if is_copy else None,
            }
        )
    tmp = out / "ground_truth.json.tmp"
    tmp.write_text(json.dumps(truth, indent=2) + "\n")
    os.replace(tmp, out / "ground_truth.json")
    return truth


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (what img2dataset stores as ``sha256`` for a downloaded image)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
