"""Shared fixtures: loopback S3, one local Ray per session, real images, and img2dataset-made LAION shards.

Every fixture here is session-scoped and built lazily: a unit test that uses none of them starts nothing
(Ray is imported only inside ``ray_session``). The expensive one, ``laion_shards`` (one img2dataset run,
about 17 s on 2 cores), runs once per session and is shared by every test that needs shards.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# The training set of ``laion_shards`` is the first N_TRAIN of ``real_images``; the others are never in it.
N_REAL_IMAGES = 80
N_TRAIN = 60
SAMPLES_PER_SHARD = 16  # 60 good + 3 bad rows → 4 shards of 16, 16, 16 and 15 rows
# Planted failures: path in the served folder → the status img2dataset records (see jobs/demo/data.py).
BAD_ROWS = {
    "bad/missing.jpg": "failed_to_download",  # not on disk: HTTP 404
    "bad/not_an_image.jpg": "failed_to_resize",  # HTML served as .jpg: "Image decoding error"
    "bad/truncated.jpg": "failed_to_resize",  # first third of a real JPEG: OpenCV refuses it
}
FAKE_AWS_KEY = "testing"
FAKE_AWS_SECRET = "testing"
AWS_REGION = "us-east-1"


class _Environ:
    """Set and unset environment variables, and put every touched one back afterwards."""

    def __init__(self) -> None:
        self._saved: dict[str, str | None] = {}

    def set(self, values: Mapping[str, str]) -> None:
        for key, value in values.items():
            self._saved.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def unset(self, *keys: str) -> None:
        for key in keys:
            self._saved.setdefault(key, os.environ.get(key))
            os.environ.pop(key, None)

    def restore(self) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------------------------------------------------
# S3


@dataclass
class S3Server:
    """A moto S3 server on loopback. ``storage_options`` are fsspec/s3fs keyword arguments."""

    endpoint_url: str
    storage_options: dict[str, Any]
    _names: Iterator[int] = field(default_factory=itertools.count, repr=False)

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a new, empty bucket and return its name (``{prefix}-{n}``, no ``s3://``)."""
        import s3fs

        name = f"{prefix}-{next(self._names)}"
        s3fs.S3FileSystem(**self.storage_options).mkdir(name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 API (moto's threaded server) on 127.0.0.1 at a free port, for the whole session.

    Sets ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (fake), ``AWS_DEFAULT_REGION`` and
    ``AWS_ENDPOINT_URL_S3`` in this process's environment, so that boto, s3fs and child processes
    (img2dataset, Ray workers started after this fixture) all reach it without options; unsets
    ``AWS_PROFILE``/``AWS_SESSION_TOKEN`` so no real credentials mix in. Yields an ``S3Server`` with
    ``.endpoint_url``, ``.storage_options`` (``{"endpoint_url", "key", "secret"}``, what s3fs takes) and
    ``.make_bucket()``. The server is stopped and the environment restored at the end of the session.
    """
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO level unless its logger already has a level.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = _Environ()
    env.unset("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL")
    env.set(
        {
            "AWS_ACCESS_KEY_ID": FAKE_AWS_KEY,
            "AWS_SECRET_ACCESS_KEY": FAKE_AWS_SECRET,
            "AWS_DEFAULT_REGION": AWS_REGION,
            "AWS_ENDPOINT_URL_S3": endpoint,
        }
    )
    try:
        yield S3Server(endpoint, {"endpoint_url": endpoint, "key": FAKE_AWS_KEY, "secret": FAKE_AWS_SECRET})
    finally:
        server.stop()
        env.restore()


# ---------------------------------------------------------------------------------------------------------
# Ray


@pytest.fixture(scope="session")
def ray_session(s3_server: S3Server) -> Iterator[Any]:
    """One local Ray (2 CPUs, no dashboard, services on 127.0.0.1, auth off) for the whole session.

    Depends on ``s3_server`` so the S3 environment exists first; it is also passed to every worker through
    ``runtime_env`` (with ``NO_ALBUMENTATIONS_UPDATE``). The Ray environment variables stay set for the
    session, so subprocesses attaching with ``RAY_ADDRESS`` see the same settings. Yields Ray's context
    (``.address_info``); shuts Ray down at the end.
    """
    from copyscan.jobs._runtime import DRIVER_ENV, FORWARDED_ENV, WORKER_ENV

    env = _Environ()
    env.unset("RAY_ADDRESS")  # always a private cluster, never one the developer happens to point at
    env.set({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", **DRIVER_ENV})
    import ray

    worker_env = {**WORKER_ENV, **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    context = ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": worker_env},
        logging_level=logging.WARNING,
    )
    try:
        yield context
    finally:
        ray.shutdown()
        env.restore()


# ---------------------------------------------------------------------------------------------------------
# Real images and LAION shards


@pytest.fixture(scope="session")
def real_images() -> list[Path]:
    """``N_REAL_IMAGES`` (80) distinct real images (Wesnoth campaign art from ``DEMO_PACKAGES``), fixed order.

    Unpacked once into the copyscan cache (``$COPYSCAN_CACHE``); the first call on a fresh machine runs
    ``apt-get download`` (≈ 47 MB).
    """
    from copyscan.jobs.demo.sample_images import DEMO_PACKAGES, real_image_files

    return real_image_files(N_REAL_IMAGES, packages=DEMO_PACKAGES)


@dataclass
class LaionShards:
    """img2dataset output in a local folder, made from real images served over loopback HTTP."""

    folder: str  # the img2dataset output folder: NNNNN.tar, NNNNN.parquet, NNNNN_stats.json
    shard_urls: list[str]  # sorted, ``{folder}/NNNNN.tar``
    url_list: str  # the LAION-style metadata parquet given to img2dataset
    base_url: str  # the HTTP server, serving ``served`` for the whole session
    served: Path  # train/{i:05d}_{name} copies of the training images, and bad/*
    source_images: list[Path]  # the training images (paths from ``real_images``), in row order
    key_of_source: dict[Path, str]  # training image → img2dataset key (all of them downloaded)
    bad_rows: dict[str, str]  # source_id of each planted failure → status img2dataset gives it
    source_id_of: dict[Path, str] = field(default_factory=dict)  # training image → ``source_id`` column
    # LAION's provenance columns of the url list (``laion_columns``), in its row order
    columns: dict[str, list] = field(default_factory=dict)


def laion_columns(n: int) -> dict[str, list]:
    """LAION's provenance columns for ``n`` rows of a test url list (row i's values are a function of i):
    what the shards' .json keep and the matches carry."""
    return {
        "LICENSE": [("?", "cc-by-4.0", "cc-by-nc-sa")[i % 3] for i in range(n)],
        "pwatermark": [round(i / (n + 1), 4) for i in range(n)],
        "punsafe": [round(1 - i / (n + 1), 4) for i in range(n)],
        "similarity": [round(0.2 + 0.1 * (i % 5) / 5, 4) for i in range(n)],
    }


@pytest.fixture(scope="session")
def laion_shards(real_images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaionShards]:
    """LAION-format shards made the way a user makes them: img2dataset downloading over HTTP.

    The first ``N_TRAIN`` (60) real images are served from a loopback HTTP server (kept up for the
    session) with three bad rows appended (a 404, HTML named .jpg, a truncated JPEG), listed in a
    metadata parquet, and downloaded by img2dataset into 4 shards of ≤ 16 rows. Runs once per session.
    """
    from copyscan.jobs.demo.data import (
        run_img2dataset,
        serve_directory,
        source_keys,
        stage_images,
        write_url_list,
    )

    work = tmp_path_factory.mktemp("laion")
    served = work / "served"
    train = list(real_images[:N_TRAIN])
    staged = stage_images(train, served / "train")
    bad = served / "bad"
    bad.mkdir()
    (bad / "not_an_image.jpg").write_text("<html><body>404 Not Found</body></html>\n")
    some_jpeg = next(p for p in staged if p.suffix.lower() in (".jpg", ".jpeg")).read_bytes()
    (bad / "truncated.jpg").write_bytes(some_jpeg[: len(some_jpeg) // 3])
    rows = staged + [served / name for name in BAD_ROWS]
    with serve_directory(served) as base_url:
        columns = laion_columns(len(rows))
        url_list = write_url_list(
            rows, base_url, str(work / "urls.parquet"), root=served, extra_columns=columns
        )
        folder = str(work / "shards")
        shard_urls = run_img2dataset(url_list, folder, number_sample_per_shard=SAMPLES_PER_SHARD)
        keys = source_keys(folder)
        source_ids = {
            src: path.relative_to(served).as_posix() for src, path in zip(train, staged, strict=True)
        }
        yield LaionShards(
            folder=folder,
            shard_urls=shard_urls,
            url_list=url_list,
            base_url=base_url,
            served=served,
            source_images=train,
            key_of_source={src: keys[sid] for src, sid in source_ids.items()},
            bad_rows=dict(BAD_ROWS),
            source_id_of=source_ids,
            columns=columns,
        )


@pytest.fixture(scope="session")
def generated(laion_shards, real_images, tmp_path_factory):
    """Generated images: 8 planted copies of ``laion_shards``' training images, 8 images from outside the
    training set; (folder, ground truth)."""
    from copyscan.jobs.demo.data import make_generated_images

    train = set(laion_shards.source_images)
    others = [p for p in real_images if p not in train]
    folder = tmp_path_factory.mktemp("generated")
    truth = make_generated_images(
        laion_shards.source_images, others, str(folder), n_copies=8, n_unrelated=8, seed=3
    )
    return folder, truth


@dataclass
class LaionShardsS3:
    """The ``laion_shards`` files in a bucket of the loopback S3 server."""

    bucket: str  # bucket name, no s3://
    folder: str  # s3://{bucket}/shards
    shard_urls: list[str]  # s3://{bucket}/shards/NNNNN.tar, sorted
    pattern: str  # s3://{bucket}/shards/{00000..0000N}.tar
    storage_options: dict[str, Any]
    key_of_source: dict[Path, str]


@pytest.fixture(scope="session")
def laion_shards_s3(s3_server: S3Server, laion_shards: LaionShards) -> LaionShardsS3:
    """``laion_shards`` uploaded as-is (tars, parquets, stats) to ``s3://{fresh bucket}/shards/``.

    Uploaded rather than downloaded again: img2dataset writing straight to S3 is tested once in
    tests/integration/test_demo_data.py; every other S3 test reuses these bytes.
    """
    from copyscan.indexing.store import storage

    bucket = s3_server.make_bucket("laion")
    folder = f"s3://{bucket}/shards"
    fs, _ = storage.get_fs(folder, s3_server.storage_options)
    for name in sorted(os.listdir(laion_shards.folder)):
        fs.put_file(os.path.join(laion_shards.folder, name), f"{bucket}/shards/{name}")
    names = [url.rsplit("/", 1)[1] for url in laion_shards.shard_urls]
    first, last = names[0][: -len(".tar")], names[-1][: -len(".tar")]
    return LaionShardsS3(
        bucket=bucket,
        folder=folder,
        shard_urls=[f"{folder}/{name}" for name in names],
        pattern=f"{folder}/{{{first}..{last}}}.tar",
        storage_options=dict(s3_server.storage_options),
        key_of_source=dict(laion_shards.key_of_source),
    )


# ---------------------------------------------------------------------------------------------------------
# Headless Chromium (Debian's package) for the HTML report


CHROMIUM = os.environ.get("COPYSCAN_CHROMIUM", "/usr/bin/chromium")
# No background connections: this machine's network is closed and Chromium would retry them at every start.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (no browser download: ``executable_path``)."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"{CHROMIUM} not found: install Debian's chromium (`make test` does it when run as root: "
            "apt-get install chromium) or set COPYSCAN_CHROMIUM"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class LoadedPage:
    page: Any
    console_errors: list[str]
    seconds: float


@pytest.fixture
def open_page(browser: Any) -> Iterator[Any]:
    """``open_page(path)`` → LoadedPage: the page loaded until ``body[data-ready]``, errors collected."""
    import time

    contexts = []

    def load(path: str) -> LoadedPage:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
        t0 = time.perf_counter()
        page.goto(Path(path).resolve().as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        return LoadedPage(page, errors, time.perf_counter() - t0)

    yield load
    for context in contexts:
        context.close()


# ---------------------------------------------------------------------------------------------------------
# A tiny Stable Diffusion checkpoint (copyscan generate), built without a download


@pytest.fixture(scope="session")
def tiny_sd_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised Stable Diffusion pipeline saved with ``save_pretrained`` (≈ 0.5 MB): the
    memorisation bench's miniature pipeline (``bench.memorization.build_pipeline``: 2-block UNet and
    AutoencoderKL, latents at half the image size, a 2-layer CLIPTextModel over letters, DDIM) at 32 px
    and width 8."""
    from bench.memorization import build_pipeline

    root = tmp_path_factory.mktemp("tiny-sd")
    pipe = build_pipeline(str(root), 32, seed=0, width=8, vae_width=8, heads=4, groups=4)
    folder = root / "tiny-sd"
    pipe.save_pretrained(str(folder))
    return str(folder)
