"""Real-image corpus: filters, near-duplicate hashing, and fetching a small Debian package without root."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.read.images import composite_rgb, open_rgb
from copyscan.jobs.demo import sample_images as si

SMALL_PACKAGE = "wesnoth-1.16-dw"  # 5.2 MB: six campaign portraits and paintings


def _picture(seed: int, size: tuple[int, int] = (200, 160)) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(6, 6, 3)).astype(np.uint8)
    return Image.fromarray(coarse, "RGB").resize(size, Image.Resampling.BICUBIC)


def test_sources_table():
    assert set(si.DEMO_PACKAGES) <= set(si.SOURCES)
    assert not [name for name in list(si.SOURCES) + list(si.EXTRA_SOURCES) if "openclipart" in name]
    assert si._matches("usr/share/x/a/b/c.png", si.Source(("usr/share/x/*",)))  # '*' crosses folders
    assert not si._matches("usr/share/x/l10n/c.png", si.Source(("usr/share/x/*",), ("*/l10n/*",)))
    assert not si._matches("usr/share/y/c.png", si.Source(("usr/share/x/*",)))


def test_variants_are_recognised():
    stems = {
        "konrad-human",
        "konrad-human-glad",
        "heavy-infantry",
        "archer",
        "archer+female",
        "trow_intro_01",
    }
    assert si._is_variant("konrad-human-glad", stems, "-_+")
    assert si._is_variant("archer+female", stems, "-_+")
    assert not si._is_variant("konrad-human", stems, "-_+")
    assert not si._is_variant("heavy-infantry", stems, "-_+")  # no "heavy" file
    assert not si._is_variant("trow_intro_01", stems, "-_+")


def test_hash_survives_resizing_and_separates_pictures():
    a, b = _picture(0), _picture(1)
    ha = np.frombuffer(si.perceptual_hash(a), np.uint8)
    resized = np.frombuffer(si.perceptual_hash(a.resize((90, 71))), np.uint8)
    other = np.frombuffer(si.perceptual_hash(b), np.uint8)
    assert si.hash_distance(ha, resized[None])[0] < si.MAX_HASH_DISTANCE
    assert si.hash_distance(ha, other[None])[0] > si.MAX_HASH_DISTANCE


def test_cut_out_matches_the_same_picture_on_black():
    cut_out = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    cut_out.paste(_picture(2, (120, 160)), (40, 20))
    on_black = composite_rgb(cut_out, (0, 0, 0))
    unrelated = composite_rgb(Image.new("RGBA", (200, 200), (0, 0, 0, 0)).copy(), (0, 0, 0))
    unrelated.paste(_picture(3, (120, 160)), (40, 20))
    hashes = [si.image_hashes(cut_out), si.image_hashes(on_black), si.image_hashes(unrelated)]
    assert len(hashes[0]) == 16 and hashes[1][:8] == hashes[1][8:]  # opaque: both halves equal
    assert si.deduplicate(hashes) == [0, 2]


def test_deduplicate_keeps_first_of_each_group():
    base = np.zeros(8, np.uint8)
    near = base.copy()
    near[0] = 0b00000111  # 3 bits away
    far = np.full(8, 0xFF, np.uint8)
    assert si.deduplicate([base.tobytes(), near.tobytes(), far.tobytes(), far.tobytes()]) == [0, 2]
    assert si.deduplicate([base.tobytes(), near.tobytes()], max_distance=2) == [0, 1]


def test_inspect_image_filters(tmp_path):
    good = tmp_path / "good.png"
    _picture(4).save(good)
    assert si.inspect_image(good) is not None
    _picture(4, (100, 300)).save(tmp_path / "narrow.png")  # min side 100 < 128
    assert si.inspect_image(tmp_path / "narrow.png") is None
    Image.new("RGB", (300, 300), (90, 90, 90)).save(tmp_path / "flat.png")
    assert si.inspect_image(tmp_path / "flat.png") is None
    sparse = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    sparse.paste(_picture(5, (100, 100)), (0, 0))  # 11 % opaque
    sparse.save(tmp_path / "sparse.png")
    assert si.inspect_image(tmp_path / "sparse.png") is None
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    assert si.inspect_image(tmp_path / "broken.png") is None


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> pathlib.Path:
    cache = tmp_path_factory.mktemp("debs")
    (cache / f"{SMALL_PACKAGE}.tmp").mkdir()  # what an interrupted extraction leaves behind
    (cache / f"{SMALL_PACKAGE}.tmp" / "junk").write_text("x")
    try:
        si.package_root(SMALL_PACKAGE, cache)
    except CopyscanError as error:
        if si._installed_version(SMALL_PACKAGE) is None:
            pytest.skip(f"cannot fetch the Debian package {SMALL_PACKAGE} here: {error}")
        raise
    return cache


def test_package_is_unpacked_once_and_atomically(small_cache):
    root, version = si.package_root(SMALL_PACKAGE, small_cache)
    if version.startswith("installed-"):
        pytest.skip(f"{SMALL_PACKAGE} is installed; files are read in place")
    assert root == small_cache / SMALL_PACKAGE and (root / ".complete").exists()
    assert not (small_cache / f"{SMALL_PACKAGE}.tmp").exists()
    assert SMALL_PACKAGE in version and not list(small_cache.glob("**/*.deb"))
    # everything unpacked is what the table names
    files = [p for p in root.rglob("*") if p.is_file() and p.name != ".complete"]
    assert files and all(
        si._matches(p.relative_to(root).as_posix(), si.SOURCES[SMALL_PACKAGE]) for p in files
    )


def test_real_image_files_from_a_small_package(small_cache):
    available = len(si.deduplicate([h for _, h in si.package_inventory(SMALL_PACKAGE, small_cache)]))
    assert available >= 5
    files = si.real_image_files(available, packages=[SMALL_PACKAGE], cache_dir=small_cache)
    assert len(files) == len(set(files)) == available
    assert files == si.real_image_files(available, packages=[SMALL_PACKAGE], cache_dir=small_cache)
    assert files[:3] == si.real_image_files(3, packages=[SMALL_PACKAGE], cache_dir=small_cache)
    assert files != sorted(files)  # shuffled, not path order
    for path in files:
        img = open_rgb(path)
        assert img.mode == "RGB" and min(img.size) >= si.MIN_SIDE
    with pytest.raises(CopyscanError, match=f"only {available} distinct images"):
        si.real_image_files(available + 1, packages=[SMALL_PACKAGE], cache_dir=small_cache)
    with pytest.raises(CopyscanError, match="no image source"):
        si.real_image_files(1, packages=["openclipart-png"], cache_dir=small_cache)


def test_domains_are_disjoint_and_named():
    assert si.DOMAINS[0] == si.DEFAULT_DOMAIN == "art" and len(si.DOMAINS) >= 3
    assert si.domain_packages("art") == tuple(si.SOURCES)
    packages = [name for domain in si.DOMAINS for name in si.domain_packages(domain)]
    assert len(packages) == len(set(packages))  # a package belongs to one domain
    assert not [name for name in packages if "openclipart" in name or "tuxpaint-stamps" in name]
    for domain in si.DOMAINS:
        for name in si.domain_packages(domain):
            assert si._source(name) is si.DOMAIN_SOURCES[domain][name]
    # the patterns of one domain's packages select no file another domain's select
    patterns = {
        d: [p for n in si.domain_packages(d) for p in si.DOMAIN_SOURCES[d][n].patterns] for d in si.DOMAINS
    }
    for a in si.DOMAINS:
        for b in si.DOMAINS:
            if a != b:
                assert not any(
                    p.rstrip("*").startswith(q.rstrip("*")) for p in patterns[a] for q in patterns[b]
                )
    with pytest.raises(CopyscanError, match="unknown image domain 'comics'; known: art, icons, screenshots"):
        si.domain_packages("comics")
    with pytest.raises(CopyscanError, match="unknown image domain"):
        si.real_image_files(1, domain="comics")


def test_real_image_files_of_a_domain(small_cache, monkeypatch):
    # a domain of the one small package: the same files, in the same order, as naming the package
    monkeypatch.setitem(si.DOMAIN_SOURCES, "tiny", {SMALL_PACKAGE: si.SOURCES[SMALL_PACKAGE]})
    root, _ = si.package_root(SMALL_PACKAGE, small_cache)
    by_domain = si.real_image_files(4, domain="tiny", cache_dir=small_cache)
    assert by_domain == si.real_image_files(4, packages=[SMALL_PACKAGE], cache_dir=small_cache)
    assert all(si._matches(p.relative_to(root).as_posix(), si.SOURCES[SMALL_PACKAGE]) for p in by_domain)
