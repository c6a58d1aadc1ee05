"""A deterministic corpus of distinct real images (paintings, photos, renders) taken from Debian packages.

Used by the demo, the tests and ``bench/copy_eval.py`` wherever real pixels matter (synthetic noise says nothing
about copy detection). Files come from packages that are installed (read in place) or fetched without root:
``apt-get download`` into a cache (``$COPYSCAN_CACHE/debs``, default ``~/.cache/copyscan/debs``), then only the
members named in the package's ``Source`` (``copyscan.jobs.demo.sources``) are unpacked, into a temporary folder renamed when complete, so an interrupted
extraction is redone. ``apt-get download`` needs the package lists (``apt-get update``) but not root.

Every image passes the same filters: min side ≥ ``MIN_SIDE``, at least ``MIN_OPAQUE`` of it opaque, not flat
(grey std ≥ ``MIN_STD`` after compositing on white), and no near-duplicate (64-bit DCT hash within
``MAX_HASH_DISTANCE`` bits of an image kept earlier). Openclipart packages are never used here: they are
reserved for an independent evaluation.

The default corpus is the ``art`` domain (``SOURCES``: game art, renders, astronomical images, wallpapers);
``real_image_files(n, domain="icons")`` and ``"screenshots"`` give the benches' other domains (``DOMAINS``).
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import pathlib
import shutil
import subprocess
import tarfile
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.read.images import composite_rgb
from copyscan.jobs.demo.sources import (
    DEFAULT_DOMAIN,
    DEMO_PACKAGES,
    DOMAIN_SOURCES,
    DOMAINS,
    EXTRA_SOURCES,
    SOURCES,
    Source,
)

__all__ = [
    "DEFAULT_DOMAIN",
    "DEMO_PACKAGES",
    "DOMAINS",
    "DOMAIN_SOURCES",
    "EXTRA_SOURCES",
    "SOURCES",
    "Source",
    "domain_packages",
    "package_file",
    "real_image_files",
]


EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MIN_SIDE = 128
MIN_OPAQUE = 0.25
MIN_STD = 12.0
MAX_HASH_DISTANCE = 10
SHUFFLE_SEED = 20240601
# Changing a filter or the hash changes which files an inventory holds: bump to rebuild cached inventories.
INVENTORY_VERSION = 3


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    base = os.environ.get("COPYSCAN_CACHE", os.path.expanduser("~/.cache/copyscan"))
    return pathlib.Path(base) / "debs"


# ---------------------------------------------------------------------------------------------------------
# Getting a package's files


def _installed_version(package: str) -> str | None:
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        return None
    status, _, version = result.stdout.partition("\t")
    return version if result.returncode == 0 and status.endswith(" installed") else None


def _matches(relpath: str, source: Source) -> bool:
    return any(fnmatch.fnmatchcase(relpath, p) for p in source.patterns) and not any(
        fnmatch.fnmatchcase(relpath, p) for p in source.exclude
    )


def _download(package: str, into: pathlib.Path) -> pathlib.Path:
    result = subprocess.run(
        ["apt-get", "download", package], cwd=into, capture_output=True, text=True, check=False
    )
    debs = sorted(into.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        raise CopyscanError(
            f"`apt-get download {package}` failed: {result.stderr.strip()[-400:]}. It needs Debian's package "
            "lists (run `apt-get update` once as root) and access to a Debian mirror; or install the package."
        )
    return debs[0]


def _extract(deb: pathlib.Path, source: Source, into: pathlib.Path) -> int:
    """Unpack the regular files of ``deb`` that ``source`` names into ``into``; returns how many."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    written = 0
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            relpath = os.path.normpath(member.name).lstrip("./")
            if not member.isfile() or not _matches(relpath, source):
                continue
            target = into / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as dst:  # type: ignore[union-attr]
                shutil.copyfileobj(src, dst)
            written += 1
    if proc.wait() != 0:
        raise CopyscanError(f"dpkg-deb could not read {deb}; delete it and try again")
    return written


def _source(package: str) -> Source:
    source = EXTRA_SOURCES.get(package)
    for table in DOMAIN_SOURCES.values():
        source = source or table.get(package)
    if source is None:
        known = [name for table in DOMAIN_SOURCES.values() for name in table]
        raise CopyscanError(f"no image source for package {package!r}; known: {', '.join(known)}")
    return source


def domain_packages(domain: str) -> tuple[str, ...]:
    """The packages of one image domain (``DOMAINS``: art, the default corpus; icons; screenshots)."""
    if domain not in DOMAIN_SOURCES:
        raise CopyscanError(f"unknown image domain {domain!r}; known: {', '.join(DOMAINS)}")
    return tuple(DOMAIN_SOURCES[domain])


def package_root(package: str, cache_dir: str | os.PathLike | None = None) -> tuple[pathlib.Path, str]:
    """(root folder holding the package's files under their /usr/... paths, an id of its version).

    Installed packages are read in place; others are downloaded and unpacked once into the cache.
    """
    source = _source(package)
    version = _installed_version(package)
    if version is not None:
        return pathlib.Path("/"), f"installed-{version}"
    root = cache_root(cache_dir)
    done = root / package
    marker = done / ".complete"
    if marker.exists():
        return done, marker.read_text().strip()
    root.mkdir(parents=True, exist_ok=True)
    # One process at a time per package (parallel benches, test workers): the others wait, then find it done.
    with open(root / f"{package}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return done, marker.read_text().strip()
        return _fetch_into(package, source, root, done)


def _fetch_into(
    package: str, source: Source, root: pathlib.Path, done: pathlib.Path
) -> tuple[pathlib.Path, str]:
    # a fixed temporary name: a crashed run leaves it behind and the next run clears and redoes it
    work = root / f"{package}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    download = work / "download"
    download.mkdir()
    deb = _download(package, download)
    tree = work / "tree"
    tree.mkdir()
    if _extract(deb, source, tree) == 0:
        raise CopyscanError(f"{deb.name} holds no files matching SOURCES[{package!r}]; fix the table")
    (tree / ".complete").write_text(deb.name[: -len(".deb")] + "\n")
    shutil.rmtree(done, ignore_errors=True)
    os.replace(tree, done)
    shutil.rmtree(work, ignore_errors=True)
    return done, (done / ".complete").read_text().strip()


def package_file(package: str, relpath: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """One file of a package in SOURCES or EXTRA_SOURCES, e.g. ("python3-skimage", ".../skimage/data/chelsea.png")."""
    root, _ = package_root(package, cache_dir)
    path = root / relpath
    if not path.is_file():
        raise CopyscanError(f"{package} has no file {relpath}")
    return path


def _walk(root: pathlib.Path, source: Source) -> Iterator[pathlib.Path]:
    prefixes = set()
    for pattern in source.patterns:
        fixed = []
        for part in pattern.split("/"):
            if any(c in part for c in "*?["):
                break
            fixed.append(part)
        prefixes.add("/".join(fixed))
    for prefix in sorted(prefixes):
        for dirpath, dirnames, filenames in os.walk(root / prefix):
            dirnames.sort()
            names = [
                name
                for name in sorted(filenames)
                if name.lower().endswith(EXTENSIONS)
                and _matches((pathlib.Path(dirpath) / name).relative_to(root).as_posix(), source)
            ]
            stems = {os.path.splitext(name)[0] for name in names}
            for name in names:
                if not _is_variant(os.path.splitext(name)[0], stems, source.variant_sep):
                    yield pathlib.Path(dirpath) / name


def _is_variant(stem: str, stems: set[str], separators: str) -> bool:
    return any(stem[i] in separators and stem[:i] in stems for i in range(1, len(stem)))


# ---------------------------------------------------------------------------------------------------------
# Filters


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


_DCT32 = _dct_matrix(32)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def perceptual_hash(img: Image.Image) -> bytes:
    """64-bit DCT hash of an RGB image: signs of the 8×8 lowest frequencies of a 32×32 grey copy vs their median."""
    grey = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return np.packbits(bits).tobytes()


def hash_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between hashes a: (8,) or (n, 8) uint8 and b: (m, 8) uint8 → (m,) or (n, m) int."""
    return _POPCOUNT[np.bitwise_xor(a[..., None, :], b)].sum(-1, dtype=np.int64)


def image_hashes(img: Image.Image) -> bytes:
    """16 bytes: ``perceptual_hash`` of the image composited on white, then on black (equal if opaque).

    Comparing both catches a cut-out and the same picture saved on a black (or white) background.
    """
    on_white = perceptual_hash(composite_rgb(img, (255, 255, 255)))
    has_alpha = img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)
    return on_white + (perceptual_hash(composite_rgb(img, (0, 0, 0))) if has_alpha else on_white)


def inspect_image(path: pathlib.Path) -> dict | None:
    """Filter stats for one file, or None when it is rejected (unreadable, small, transparent or flat)."""
    try:
        with Image.open(path) as img:
            if min(img.size) < MIN_SIDE:
                return None
            img.draft("RGB", (256, 256))  # JPEG: decode at reduced size, plenty for the filters
            img.load()
            alpha = np.asarray(img.convert("RGBA").getchannel("A").resize((64, 64)))
            rgb = composite_rgb(img)
            hashes = image_hashes(img)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    if (alpha > 127).mean() < MIN_OPAQUE:
        return None
    grey = np.asarray(rgb.convert("L").resize((64, 64), Image.Resampling.BOX), dtype=np.float64)
    if grey.std() < MIN_STD:
        return None
    return {"hash": hashes.hex()}


def package_inventory(
    package: str, cache_dir: str | os.PathLike | None = None
) -> list[tuple[pathlib.Path, bytes]]:
    """(path, hash) of every image of ``package`` that passes the per-image filters, in sorted path order.

    Cached as JSON next to the unpacked files (or in the cache for installed packages), keyed by the
    package version and INVENTORY_VERSION.
    """
    root, version = package_root(package, cache_dir)
    cache = cache_root(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    inventory_path = cache / f"{package}.inventory.json"
    key = {
        "version": version,
        "inventory": INVENTORY_VERSION,
        "root": str(root),
        "source": repr(_source(package)),
    }
    if inventory_path.exists():
        saved = json.loads(inventory_path.read_text())
        if saved.get("key") == key:
            return [(root / rel, bytes.fromhex(h)) for rel, h in saved["images"]]
    images = []
    for path in _walk(root, _source(package)):
        stats = inspect_image(path)
        if stats is not None:
            images.append((path.relative_to(root).as_posix(), stats["hash"]))
    tmp = inventory_path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "images": images}))
    os.replace(tmp, inventory_path)
    return [(root / rel, bytes.fromhex(h)) for rel, h in images]


def deduplicate(hashes: Sequence[bytes], max_distance: int = MAX_HASH_DISTANCE) -> list[int]:
    """Indices of the images kept, each dropped if within ``max_distance`` bits of one kept earlier.

    hashes: ``image_hashes`` values (16 bytes: two 64-bit hashes; the distance of two images is the smallest
    over the four pairs) or single 8-byte ``perceptual_hash`` values.
    """
    kept: list[int] = []
    table = np.zeros((len(hashes), 2, 8), dtype=np.uint8)
    for i, h in enumerate(hashes):
        row = np.frombuffer(h, dtype=np.uint8).reshape(-1, 8)
        row = np.concatenate([row, row])[:2]  # an 8-byte hash stands for both composites
        if kept:
            xor = np.bitwise_xor(row[:, None, None, :], table[None, : len(kept)])  # (2, k, 2, 8)
            if _POPCOUNT[xor].sum(-1).min() <= max_distance:
                continue
        table[len(kept)] = row
        kept.append(i)
    return kept


def real_image_files(
    count: int,
    *,
    packages: Sequence[str] | None = None,
    domain: str = DEFAULT_DOMAIN,
    cache_dir: str | os.PathLike | None = None,
) -> list[pathlib.Path]:
    """``count`` distinct real images from ``packages`` (default: every package of ``domain``, by default
    ``art``: SOURCES).

    The order is fixed: the images of all packages are deduplicated in table order, then shuffled with a
    fixed seed, so sources are mixed and ``real_image_files(n)`` is a prefix of ``real_image_files(m)`` for
    n < m. Raises CopyscanError when fewer than ``count`` distinct images are available.
    """
    names = list(domain_packages(domain) if packages is None else packages)
    order_of = [name for table in DOMAIN_SOURCES.values() for name in table]
    paths: list[pathlib.Path] = []
    hashes: list[bytes] = []
    for package in sorted(names, key=lambda name: order_of.index(name) if name in order_of else -1):
        for path, h in package_inventory(package, cache_dir):
            paths.append(path)
            hashes.append(h)
    kept = [paths[i] for i in deduplicate(hashes)]
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(kept))
    if len(kept) < count:
        raise CopyscanError(
            f"only {len(kept)} distinct images in {', '.join(names)}; asked for {count}. "
            f"Add packages from copyscan.jobs.demo.sample_images.DOMAIN_SOURCES, or ask for fewer."
        )
    return [kept[i] for i in order[:count]]


# a table of what each package gives: python -m copyscan.jobs.demo.sample_images [PACKAGE or DOMAIN ...]
def _main() -> None:
    import sys

    args = sys.argv[1:]
    names = [p for arg in args for p in (domain_packages(arg) if arg in DOMAIN_SOURCES else (arg,))]
    names = names or list(SOURCES)
    total: list[bytes] = []
    for package in names:
        inventory = package_inventory(package)
        hashes = [h for _, h in inventory]
        total.extend(hashes)
        print(f"{package:28s} {len(inventory):5d} images, {len(deduplicate(hashes)):5d} after dedup")
    print(f"{'all':28s} {len(total):5d} images, {len(deduplicate(total)):5d} after dedup")


if __name__ == "__main__":
    _main()
