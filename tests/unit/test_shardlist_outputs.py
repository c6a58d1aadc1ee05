import pytest

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.read.shardlist import expand_queries, expand_shards, list_queries
from copyscan.indexing.store import storage
from copyscan.indexing.store.outputs import claim_output


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_forms_of_shard_lists(tmp_path):
    for i in range(3):
        _touch(tmp_path / "laion" / f"{i:05d}.tar")
    _touch(tmp_path / "laion" / "00000.parquet")
    folder = str(tmp_path / "laion")
    expected = [f"{folder}/{i:05d}.tar" for i in range(3)]
    assert expand_shards(folder) == expected
    assert expand_shards(folder + "/{00000..00002}.tar") == expected
    assert expand_shards(f"file://{folder}" + "/{00000..00002}.tar") == [f"file://{p}" for p in expected]
    assert expand_shards(folder + "/*.tar") == expected
    listing = tmp_path / "shards.txt"
    listing.write_text("# my shards\n" + "\n".join(expected[:2]) + "\n")
    assert expand_shards(str(listing)) == expected[:2]
    with pytest.raises(CopyscanError, match="1 of 4 shards"):
        expand_shards(folder + "/{00000..00003}.tar")
    with pytest.raises(CopyscanError, match="does not exist"):
        expand_shards(str(tmp_path / "nope"))


def test_query_folders(tmp_path):
    _touch(tmp_path / "q" / "b.png")
    _touch(tmp_path / "q" / "sub" / "a.jpg")
    _touch(tmp_path / "q" / ".hidden.jpg")
    _touch(tmp_path / "q" / "notes.md")
    _touch(tmp_path / "q" / ".git" / "config")
    _touch(tmp_path / "q" / "photo.jp2")
    _touch(tmp_path / "q" / "no_extension")
    # every visible file but sidecars is a query (its content decides whether it is an image); the others
    # are named with the reason
    listing = list_queries(str(tmp_path / "q"))
    assert listing.kind == "images"
    assert [u.rsplit("/q/", 1)[1] for u in listing.urls] == [
        "b.png",
        "no_extension",
        "photo.jp2",
        "sub/a.jpg",
    ]
    assert listing.skipped == [
        {"file": ".git/config", "reason": "hidden"},
        {"file": ".hidden.jpg", "reason": "hidden"},
        {"file": "notes.md", "reason": "metadata_file"},
    ]
    _touch(tmp_path / "t" / "00000.tar")
    _touch(tmp_path / "t" / "00000.parquet")
    _touch(tmp_path / "t" / "00000_stats.json")
    listing = list_queries(str(tmp_path / "t"))
    assert listing.kind == "shards" and [u.rsplit("/", 1)[1] for u in listing.urls] == ["00000.tar"]
    assert [s["file"] for s in listing.skipped] == ["00000.parquet", "00000_stats.json"]
    assert expand_queries(str(tmp_path / "t"))[0] == "shards"
    _touch(tmp_path / "t" / "cat.png")
    with pytest.raises(CopyscanError, match="mixes image files and .tar shards"):
        list_queries(str(tmp_path / "t"))


def test_claim_output_resume_overwrite_and_foreign(tmp_path):
    out = str(tmp_path / "out")
    cfg = {"shards": "a", "k": 1, "mode": "resume"}
    assert claim_output(out, "index.yaml", cfg, "resume", ["shards"]) is False
    storage.write_bytes(out + "/embeddings/x", b"1")
    assert claim_output(out, "index.yaml", cfg, "resume", ["shards"]) is True
    assert storage.exists(out + "/embeddings/x")
    with pytest.raises(CopyscanError, match="different settings"):
        claim_output(out, "index.yaml", {**cfg, "shards": "b"}, "resume", ["shards"])
    assert claim_output(out, "index.yaml", {**cfg, "shards": "b"}, "overwrite", ["shards"]) is False
    assert not storage.exists(out + "/embeddings/x")
    foreign = tmp_path / "foreign"
    _touch(foreign / "precious.txt")
    for mode in ("resume", "overwrite"):
        with pytest.raises(CopyscanError, match="not written by copyscan"):
            claim_output(str(foreign), "index.yaml", cfg, mode, ["shards"])
    assert (foreign / "precious.txt").exists()


def test_claim_output_reads_keys_a_run_did_not_record_as_their_old_behaviour(tmp_path):
    out = str(tmp_path / "out")
    old = {"shards": "a"}  # written before "crops" existed, when there were none
    claim_output(out, "scan.yaml", old, "resume", ["shards"])
    storage.write_bytes(out + "/chunks/x", b"1")
    keys = ["shards", "crops"]
    assert claim_output(out, "scan.yaml", {**old, "crops": 0}, "resume", keys, absent={"crops": 0})
    claim_output(out, "scan.yaml", old, "resume", ["shards"])  # the old config file again
    with pytest.raises(CopyscanError, match=r"crops: 0 -> 5"):
        claim_output(out, "scan.yaml", {**old, "crops": 5}, "resume", keys, absent={"crops": 0})
    with pytest.raises(CopyscanError, match=r"crops: None -> 0"):  # no absent value known: a change
        claim_output(out, "scan.yaml", {**old, "crops": 0}, "resume", keys)
    assert storage.exists(out + "/chunks/x")


def test_a_threshold_recorded_as_text_resumes_as_the_number_it_is(tmp_path):
    """Runs recorded ``threshold: '0.50'`` before copyscan read numbers as numbers: the same threshold."""
    out = str(tmp_path / "out")
    claim_output(out, "run.yaml", {"threshold": "0.50"}, "resume", ["threshold"])
    storage.write_bytes(out + "/chunks/x", b"1")
    assert claim_output(out, "run.yaml", {"threshold": 0.5}, "resume", ["threshold"])
    with pytest.raises(CopyscanError, match=r"threshold: 0.5 -> 'p90'"):
        claim_output(out, "run.yaml", {"threshold": "p90"}, "resume", ["threshold"])
    with pytest.raises(CopyscanError, match=r"threshold: 0.5 -> 0.6"):
        claim_output(out, "run.yaml", {"threshold": 0.6}, "resume", ["threshold"])


def test_atomic_writes_leave_no_temp_files(tmp_path):
    storage.write_json(str(tmp_path / "a" / "b.json"), {"x": 1})
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]
    assert storage.read_json(str(tmp_path / "a" / "b.json")) == {"x": 1}


def test_pair_images_are_spread_over_shards_and_sum_to_the_budget():
    from copyscan.indexing.embed.decode import pair_quota

    assert [pair_quota(400, 4, s) for s in range(4)] == [100] * 4
    for total, shards in ((10_000, 3), (10_000, 230_000), (7, 7), (0, 5), (5, 1)):
        quotas = [pair_quota(total, shards, s) for s in range(shards)]
        assert sum(quotas) == total and max(quotas) - min(quotas) <= 1
