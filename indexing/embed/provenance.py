"""Where a training image came from and under what terms: the columns a rights triage reads next to a match.

Read where the source's metadata has them (LAION's parquet columns, kept in img2dataset's per-sample .json
by its ``save_additional_columns``, or in clip-retrieval's metadata parquet), stored in each embedding
shard's metadata (``copyscan.indexing.embed.stage.METADATA_SCHEMA``) and carried into the scan's matches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# column → the names it may have in the source's metadata
PROVENANCE = {
    "license": ("LICENSE", "license"),  # LAION: the license found on the page ("?" when none)
    "pwatermark": ("pwatermark",),  # LAION's watermark detector: probability of a watermark
    "punsafe": ("punsafe",),  # LAION's NSFW detector: probability of unsafe content
    "clip_similarity": ("similarity", "clip_similarity"),  # CLIP cosine of the image and its caption
}


def provenance(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``PROVENANCE``'s columns from one sample's metadata (a mapping): the license as a string, the rest as
    floats; None where absent or not a value (NaN, a string that is not a number)."""
    out: dict[str, Any] = {}
    for column, names in PROVENANCE.items():
        value = next((meta[n] for n in names if meta.get(n) is not None), None)
        if column == "license":
            out[column] = None if value is None else str(value)
            continue
        try:
            number = float(value) if value is not None and not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        out[column] = number if number is not None and number == number else None
    return out
