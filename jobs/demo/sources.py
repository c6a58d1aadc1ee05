"""What the real-image corpus is made of: for each Debian package, the files that hold usable images, and the
image domains the benches measure on (``DOMAIN_SOURCES``). The machinery that fetches, filters and orders
them is ``copyscan.jobs.demo.sample_images``, which re-exports these names.

Openclipart packages are never used here: they are reserved for an independent evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """Where one package keeps usable images: fnmatch patterns ('*' also matches '/') rooted at '/'."""

    patterns: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    note: str = ""
    # Skip a file whose stem extends another file's stem in the same folder after one of these characters
    # ("konrad-human-glad.png" next to "konrad-human.png"): expression and costume variants of one painting.
    variant_sep: str = ""


_WESNOTH = "usr/share/games/wesnoth/1.16/data"
_CAMPAIGN_ART = (f"{_WESNOTH}/campaigns/*/images/portraits/*", f"{_WESNOTH}/campaigns/*/images/story/*")
# translated copies of story art (same picture, other text); story/characters and story/portraits hold the
# portraits again on black instead of transparent
_CAMPAIGN_EXCLUDE = ("*/l10n/*", "*/story/characters/*", "*/story/portraits/*")


def _campaign(note: str) -> Source:
    return Source(_CAMPAIGN_ART, _CAMPAIGN_EXCLUDE, note, variant_sep="-_+")


# Package → images. Sizes are the Debian 12 (bookworm) .deb downloads; counts are the distinct images each
# gives on its own (filters + near-duplicate removal; `python -m copyscan.jobs.demo.sample_images` prints this
# table). All of them together: 2,496 images pass the filters, 1,838 distinct (~1.2 GB of downloads).
SOURCES: dict[str, Source] = {
    "endless-sky-data": Source(
        (
            "usr/share/games/endless-sky/images/land/*",
            "usr/share/games/endless-sky/images/scene/*",
            "usr/share/games/endless-sky/images/planet/*",
            "usr/share/games/endless-sky/images/ship/*",
        ),
        note="69.7 MB, 362 images: photos of landscapes and cities (273), planet and ship renders",
    ),
    "wesnoth-1.16-data": Source(
        (f"{_WESNOTH}/core/images/portraits/*", f"{_WESNOTH}/core/images/story/*"),
        ("*/l10n/*",),
        note="146 MB, 189 images: painted portraits (transparent backgrounds) and story paintings",
        variant_sep="-_+",
    ),
    "wesnoth-1.16-trow": _campaign("19.6 MB, 37 images: campaign portraits and story paintings"),
    "wesnoth-1.16-httt": _campaign("12.9 MB, 16 images"),
    "wesnoth-1.16-utbs": _campaign("13.2 MB, 24 images"),
    "wesnoth-1.16-sof": _campaign("7.0 MB, 7 images"),
    "wesnoth-1.16-tsg": _campaign("8.1 MB, 11 images"),
    "wesnoth-1.16-low": _campaign("9.0 MB, 11 images"),
    "wesnoth-1.16-l": _campaign("5.5 MB, 10 images"),
    "wesnoth-1.16-nr": _campaign("8.1 MB, 14 images"),
    "wesnoth-1.16-dm": _campaign("5.4 MB, 14 images"),
    "wesnoth-1.16-did": _campaign("5.8 MB, 11 images"),
    "wesnoth-1.16-sotbe": _campaign("6.7 MB, 12 images"),
    "wesnoth-1.16-thot": _campaign("6.5 MB, 10 images"),
    "wesnoth-1.16-ei": _campaign("5.9 MB, 6 images"),
    "wesnoth-1.16-dw": _campaign("5.2 MB, 6 images"),
    "stellarium-data": Source(
        ("usr/share/stellarium/skycultures/*", "usr/share/stellarium/nebulae/default/*"),
        note="246 MB, 865 images: constellation artwork of many sky cultures, astronomical photographs",
    ),
    "gnome-backgrounds": Source(("usr/share/backgrounds/gnome/*",), note="32.5 MB, 11 images: wallpapers"),
    # Not tuxpaint-stamps-default: many Tux Paint stamps come from the Open Clip Art Library, whose images
    # are reserved for an independent evaluation of copyscan. naev-data's ARTWORK_LICENSE.yaml credits one
    # file to openclipart.org (gfx/overlay/portrait_exclamation.png), outside the folders used here.
    "naev-data": Source(
        (
            "usr/share/naev/dat/gfx/planet/exterior/*",
            "usr/share/naev/dat/gfx/planet/space/*",
            "usr/share/naev/dat/gfx/portraits/*",
            "usr/share/naev/dat/gfx/loading/*",
            "usr/share/naev/dat/gfx/intro/*",
        ),
        note="350 MB, 166 images: painted portraits, planet landscapes and renders, loading-screen paintings",
    ),
    "plasma-workspace-wallpapers": Source(
        ("usr/share/wallpapers/*",), note="94 MB, 38 images: KDE wallpapers (photos and artwork)"
    ),
    "ukui-wallpapers": Source(("usr/share/backgrounds/*",), note="21 MB, 12 images: wallpapers, photos"),
    "mate-backgrounds": Source(
        ("usr/share/backgrounds/mate/*",), note="46.6 MB, 17 images: wallpapers, photos"
    ),
}

# Further image domains, for benches that must not measure only the domain copyscan was tuned on (issue 27):
# each differs from SOURCES' painted and rendered art in what a copy detector keys on.
DOMAIN_SOURCES: dict[str, dict[str, Source]] = {
    "art": SOURCES,
    # flat shapes with a few gradients on white (transparency composited), many alike in outline
    "icons": {
        "moka-icon-theme": Source(
            ("usr/share/icons/Moka/256x256/*",),
            note="53.7 MB: the flat-colour Moka icons at 256 × 256 (application icons, most of them)",
        ),
        "oxygen-icon-theme": Source(
            ("usr/share/icons/oxygen/base/256x256/*",),
            note="31.8 MB: KDE's Oxygen icons at 256 × 256 (apps, devices, places, file types)",
        ),
    },
    # user-interface screenshots: text, widgets and flat grey, with little texture
    "screenshots": {
        "gimp-help-en": Source(
            tuple(
                f"usr/share/gimp/2.0/help/en/images/{folder}/*"
                for folder in (
                    "dialogs",
                    "menus",
                    "preferences",
                    "tool-options",
                    "toolbox",
                    "using",
                    "tutorials",
                )
            ),
            note="49.6 MB: screenshots of GIMP's dialogs, menus and tools from its English manual",
        ),
    },
}
DOMAINS: tuple[str, ...] = tuple(DOMAIN_SOURCES)
DEFAULT_DOMAIN = "art"

# Not part of the corpus: packages the tests read single known files from.
EXTRA_SOURCES: dict[str, Source] = {
    "python3-skimage": Source(
        ("usr/lib/python3/dist-packages/skimage/data/*",),
        note="20.7 MB: scikit-image's sample photos (chelsea.png: a tabby cat; coffee.png: an espresso cup)",
    ),
}

# For the demo: one 69.7 MB download, 362 distinct images (photos and renders). The smallest alternative, the
# Wesnoth campaign packages, needs eight downloads (~83 MB) for 150 images.
DEMO_PACKAGES: tuple[str, ...] = ("endless-sky-data",)
