"""Memorised-prompt discovery on real images: one prompt with a planted 12-clique, the others varied."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.read.images import open_rgb
from copyscan.search.memorized import discover as mem

SIZE = 256  # generations are written at this size (the graph aligns them to 128)


def _jpeg(x: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _near_copies(path, count: int, rng: np.random.Generator) -> list[bytes]:
    """``count`` generations that differ like memorised ones: pixel noise, brightness, JPEG."""
    from copyscan.search.verify.pixel import align

    base = align(open_rgb(path), SIZE).astype(np.float32)
    out = []
    for _ in range(count):
        x = base * rng.uniform(0.97, 1.03) + rng.normal(0.0, 6.0, base.shape)
        out.append(_jpeg(np.clip(x, 0, 255).astype(np.uint8), int(rng.integers(80, 95))))
    return out


def _varied(paths) -> list[bytes]:
    from copyscan.search.verify.pixel import align

    return [_jpeg(align(open_rgb(p), SIZE)) for p in paths]


def make_generations(real_images, folder, seed: int = 0) -> dict[str, dict]:
    """Three prompts in two webdataset shards (prompt A spans both), plus broken samples.

    A: 12 near-copies of one image + 6 other images → clique 12 (flagged);
    B: 9 near-copies of another image + 5 other images → clique 9 (below 10, not flagged);
    C: 14 different images → no clique. Returns prompt → {"clique": keys, "keys": all keys}.
    """
    rng = np.random.default_rng(seed)
    others = iter(real_images[2:])
    groups = {
        "a castle on a hill, oil painting": (
            _near_copies(real_images[0], 12, rng),
            _varied([next(others) for _ in range(6)]),
        ),
        "a spaceship over a red planet": (
            _near_copies(real_images[1], 9, rng),
            _varied([next(others) for _ in range(5)]),
        ),
        "a portrait of a knight": ([], _varied([next(others) for _ in range(14)])),
    }
    samples, truth = [], {}
    for g, (prompt, (copies, varied)) in enumerate(groups.items()):
        keys = [f"{g}{i:04d}" for i in range(len(copies) + len(varied))]
        truth[prompt] = {"clique": keys[: len(copies)], "keys": keys}
        json_prompt = g == 1  # B's prompt is in the JSON, the others in .txt
        for key, data in zip(keys, copies + varied, strict=True):
            members = [(f"{key}.jpg", data)]
            if json_prompt:
                members.append((f"{key}.json", json.dumps({"prompt": prompt, "seed": 1}).encode()))
            else:
                members.append((f"{key}.txt", prompt.encode()))
            samples.append(members)
    order = rng.permutation(len(samples))
    samples = [samples[i] for i in order]
    samples.append(
        [
            ("9truncated.jpg", _varied(real_images[-1:])[0][:3000]),
            ("9truncated.txt", b"a portrait of a knight"),
        ]
    )
    samples.append([("9noprompt.jpg", _jpeg(np.zeros((64, 64, 3), np.uint8)))])
    truth["a portrait of a knight"]["keys"].append("9truncated")
    half = len(samples) // 2
    for name, part in (("00000.tar", samples[:half]), ("00001.tar", samples[half:])):
        with tarfile.open(folder / name, "w") as tar:
            for members in part:
                for member, data in members:
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return truth


def _listing(folder) -> pa.Table:
    found = [mem.list_shard(str(folder / name)) for name in ("00000.tar", "00001.tar")]
    assert sum(len(r["no_prompt"]) for r in found) == 1
    return pa.table(
        {
            "prompt": [p for r in found for p in r["prompts"]],
            "source": [r["source"] for r in found for _ in r["keys"]],
            "key": [k for r in found for k in r["keys"]],
        }
    )


def test_one_prompt_with_a_12_clique_is_flagged(real_images, tmp_path):
    truth = make_generations(real_images, tmp_path)
    listing = _listing(tmp_path)
    groups: dict[str, list] = {}
    for prompt, source, key in zip(
        *(listing[c].to_pylist() for c in ("prompt", "source", "key")), strict=True
    ):
        groups.setdefault(prompt, []).append((source, key))
    assert {p: sorted(k for _, k in refs) for p, refs in groups.items()} == {
        p: sorted(t["keys"]) for p, t in truth.items()
    }
    table, stats = mem.process_prompts(list(groups.items()), mem.GraphSpec())
    rows = {r["prompt"]: r for r in table.to_pylist()}
    a, b, c = (rows[p] for p in truth)
    assert a["flagged"] and a["clique_exact"] and a["clique_size"] == 12
    assert sorted(a["clique_keys"]) == sorted(truth["a castle on a hill, oil painting"]["clique"])
    assert len({s for s in a["clique_sources"]}) == 2  # the clique spans both shards
    assert 0 < a["mean_clique_distance"] <= a["max_clique_distance"] < 0.08
    assert a["clique_member_distance"] == sorted(a["clique_member_distance"])
    assert not b["flagged"] and b["clique_size"] == 9
    assert sorted(b["clique_keys"]) == sorted(truth["a spaceship over a red planet"]["clique"])
    assert not c["flagged"] and c["clique_size"] <= 2 and c["errors"] == 1 and c["n_images"] == 14
    assert stats["flagged"] == 1 and stats["errors"] == {"truncated": 1}
    ranked = mem.rank_prompts(table)
    assert ranked["prompt"].to_pylist()[0] == "a castle on a hill, oil painting" and ranked[
        "rank"
    ].to_pylist() == [0, 1, 2]
    # a stricter rule flags nothing; a looser one cannot merge the varied images into A's clique
    strict = mem.process_prompts(list(groups.items()), mem.GraphSpec(min_clique=13))[0]
    assert not any(strict["flagged"].to_pylist())


def test_ranking_puts_flagged_first_by_mean_distance():
    rows = [
        {"prompt": "p1", "clique_size": 30, "flagged": True, "mean_clique_distance": 0.05},
        {"prompt": "p2", "clique_size": 11, "flagged": True, "mean_clique_distance": 0.01},
        {"prompt": "p3", "clique_size": 9, "flagged": False, "mean_clique_distance": 0.001},
        {"prompt": "p4", "clique_size": 1, "flagged": False, "mean_clique_distance": None},
    ]
    full = [{f.name: None for f in mem.PART_SCHEMA} | r for r in rows]
    ranked = mem.rank_prompts(pa.Table.from_pylist(full[::-1], mem.PART_SCHEMA))
    assert ranked["prompt"].to_pylist() == ["p2", "p1", "p3", "p4"]


def test_assign_tasks_groups_prompts_by_where_they_appear():
    listing = pa.table(
        {
            "prompt": ["x", "y", "x", "z", "w", "y"],
            "source": ["s0", "s0", "s1", "s1", "s2", "s2"],
            "key": list("abcdef"),
        }
    )
    planned = mem.assign_tasks(listing, 2)
    assert planned["task"].to_pylist() == [0, 0, 0, 1, 1, 0]
    assert mem.assign_tasks(listing, 2).equals(planned)


def test_prompt_sources_and_manifests(tmp_path):
    assert mem.prompt_of({"prompt": "p", "caption": "c"}, "t") == "p"
    assert mem.prompt_of({"caption": "c"}, "t") == "t"
    assert mem.prompt_of({"caption": "c"}, None) == "c"
    assert mem.prompt_of({}, "  ") is None
    (tmp_path / "img").mkdir()
    lines = [{"path": "img/a.png", "prompt": "p"}, {"path": "s3://b/x.png", "prompt": "q"}]
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    url = mem.find_manifest(str(tmp_path))
    assert url == str(tmp_path / "manifest.jsonl")
    table = mem.read_manifest(url)
    assert table["source"].to_pylist() == [str(tmp_path / "img" / "a.png"), "s3://b/x.png"]
    assert table["key"].to_pylist() == ["img/a.png", "s3://b/x.png"]
    (tmp_path / "bad.csv").write_text("file,prompt\na.png,p\n")
    with pytest.raises(CopyscanError, match="lacks column"):
        mem.read_manifest(str(tmp_path / "bad.csv"))


def test_config_is_validated():
    from copyscan.indexing.runtime.config import resolve
    from copyscan.search.memorized.config import MemorizedConfig

    with pytest.raises(CopyscanError, match="graph_size .* multiple of tiles"):
        resolve(MemorizedConfig, {"generations": "g", "out": "o", "graph_size": 130})
    cfg = resolve(MemorizedConfig, {"generations": "g", "out": "o"})
    assert cfg.edge_threshold == 0.08 and cfg.min_clique == 10 and cfg.graph_size == 128
