"""copyscan generate and nightly --generate on a local Ray: a tiny randomly initialised Stable Diffusion
checkpoint (``tiny_sd_checkpoint``) run on a CPU actor, its shards scanned, cliqued, resumed."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from copyscan.indexing.index_config import IndexConfig
from copyscan.indexing.index_ray import run_index
from copyscan.indexing.runtime.config import resolve

TINY = ["steps=3", "width=32", "height=32", "per_prompt=2", "actor_cpus=1", "torch_threads=1"]


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def small_index(ray_session, laion_shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gen-index") / "index")
    run_index(resolve(IndexConfig, {"shards": laion_shards.folder, "out": out}))
    return out


def test_generate_records_seeds_and_scores_and_resumes_per_shard(
    ray_session, s3_server, tiny_sd_checkpoint, tmp_path, capsys
):
    """The checkpoint on (loopback) S3, copied once to the actor's cache; the output on local disk."""
    import s3fs

    from copyscan.jobs import generate
    from copyscan.search.generate.sampling import Sampler, SampleSettings, checkpoint_id
    from copyscan.search.generate.shards import encode_jpeg

    bucket = s3_server.make_bucket("ckpt")
    s3fs.S3FileSystem(**s3_server.storage_options).put(
        tiny_sd_checkpoint, f"{bucket}/tiny-sd", recursive=True
    )
    remote = f"s3://{bucket}/tiny-sd"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n\na photo of a memorised painting\n")
    out = tmp_path / "gen"
    argv = ["--checkpoint", remote, "--prompts", str(prompts), "--out", str(out)]
    argv += [*TINY, "prompts_per_shard=1", "batch_size=1", "score_steps=2", f"cache_dir={tmp_path / 'cache'}"]
    assert generate.JOB.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == 3 and summary["generations"] == 6 and summary["shards_total"] == 3
    assert summary["prompt_reading"]["blank_prompts"] == 1
    # the same checkpoint wherever it lies: the id of the S3 copy is the local folder's
    assert summary["checkpoint_id"] == checkpoint_id(tiny_sd_checkpoint)
    cached = tmp_path / "cache" / "checkpoints" / summary["checkpoint_id"]
    assert (cached / "model_index.json").read_bytes() == (
        Path(tiny_sd_checkpoint) / "model_index.json"
    ).read_bytes()
    tars = sorted((out / "shards").glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    members = _members(tars[1])
    assert sorted(members) == [f"000001_00{g}.{ext}" for g in range(2) for ext in ("jpg", "json", "txt")]
    meta = json.loads(members["000001_001.json"])
    assert meta["prompt"] == "a blue dog" == members["000001_001.txt"].decode()
    assert meta["checkpoint_id"] == summary["checkpoint_id"] and meta["scheduler"] == "DDIMScheduler"
    assert (meta["steps"], meta["width"], meta["guidance"], meta["score_steps"]) == (3, 32, 7.5, 2)
    assert len(meta["score_per_step"]) == 3
    assert meta["memorization_score"] == pytest.approx(np.mean(meta["score_per_step"][:2]), rel=1e-6)

    # the generation again, in this process from its recorded seed: the same image bytes and score
    sampler = Sampler(tiny_sd_checkpoint, "cpu")
    again = sampler.sample([meta["prompt"]], [meta["seed"]], SampleSettings(3, 7.5, 32, 32, 2))
    assert encode_jpeg(again.images[0], 95) == members["000001_001.jpg"]
    assert float(again.scores[0]) == pytest.approx(meta["memorization_score"], rel=1e-5)

    scores = pq.read_table(out / "prompt_scores.parquet").to_pylist()
    assert [r["rank"] for r in scores] == [0, 1, 2] and scores[0]["score"] >= scores[-1]["score"]
    blue = next(r for r in scores if r["prompt"] == "a blue dog")
    per_gen = [json.loads(members[f"000001_00{g}.json"])["memorization_score"] for g in range(2)]
    assert blue["score"] == pytest.approx(np.mean(per_gen), rel=1e-5) and blue["generations"] == 2

    # resume: a rerun makes nothing; without shard 1's marker it remakes shard 1 alone, identically
    before = {t.name: (t.read_bytes(), t.stat().st_mtime_ns) for t in tars}
    assert generate.JOB.main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["shards_resumed"] == 3
    (out / "markers" / "shard_00001.json").unlink()
    (out / "shards" / "00001.tar").unlink()
    assert generate.JOB.main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["shards_resumed"] == 2
    after = {t.name: (t.read_bytes(), t.stat().st_mtime_ns) for t in sorted((out / "shards").glob("*.tar"))}
    assert after["00001.tar"][0] == before["00001.tar"][0]
    assert after["00000.tar"] == before["00000.tar"] and after["00002.tar"] == before["00002.tar"]
    # other sampling settings, or other weights at the same URL, in the same output: refused, not mixed
    capsys.readouterr()
    assert generate.JOB.main([*argv, "steps=4"]) == 2
    assert "different settings (steps: 3 -> 4)" in capsys.readouterr().err
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    fs.pipe(f"{bucket}/tiny-sd/unet/notes.json", b"{}")
    assert generate.JOB.main(argv) == 2
    assert "different settings (checkpoint_id: 'tiny-sd@" in capsys.readouterr().err


@pytest.mark.slow
def test_nightly_generates_scans_finds_cliques_and_compares_scores(small_index, tiny_sd_checkpoint, tmp_path):
    """``copyscan nightly --checkpoint DIR --generate ...``: prompts from a file and the index's training
    captions, scanned against the index, cliqued, reported; a second night of the same weights under
    another name scores every shared prompt the same (same prompts, same seeds)."""
    from copyscan.jobs import nightly

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    history = tmp_path / "history"
    argv = ["--checkpoint", tiny_sd_checkpoint, "--index", small_index, "--history", str(history)]
    argv += ["threshold=0.9", "--generate", f"prompts={prompts}", "captions=3", *TINY, "batch_size=4"]
    assert nightly.JOB.main(argv) == 0
    generations = history / "generations" / "tiny-sd"
    gen_summary = json.loads((generations / "summary.json").read_text())
    assert gen_summary["prompts"] == 5 and gen_summary["generations"] == 10
    origins = pq.read_table(generations / "plan.parquet").column("origin").to_pylist()
    assert origins == ["file", "file", "captions", "captions", "captions"]
    # the scan read every generation and its prompt
    run = history / "runs" / "tiny-sd"
    scan_summary = json.loads((run / "summary.json").read_text())
    assert scan_summary["queries"] == 10 and scan_summary["rejected"] == 0
    matches = pq.read_table(run / "matches")
    plan_prompts = set(pq.read_table(generations / "plan.parquet").column("prompt").to_pylist())
    assert set(matches.column("prompt").to_pylist()) == plan_prompts
    # copyscan memorized read the same shards: 5 prompts of 2 generations each
    mem = json.loads((history / "memorized" / "tiny-sd" / "summary.json").read_text())
    assert mem["prompts"] == 5 and mem["generations"] == 10
    regression = json.loads((history / "regression" / "tiny-sd.json").read_text())
    scores = regression["memorization_score"]
    assert scores["distribution"]["count"] == 5 and scores["vs_previous"] is None
    # the highest-scoring prompts, each next to its clique and its generations' best training match
    top = scores["top_prompts"]
    assert [t["prompt"] for t in top] == pq.read_table(generations / "prompt_scores.parquet")[
        "prompt"
    ].to_pylist()
    best = matches.filter(pc.equal(matches["rank"], 0)).to_pylist()
    for t in top:
        assert t["clique_size"] in (1, 2) and t["flagged"] is False
        expected = max((r for r in best if r["prompt"] == t["prompt"]), key=lambda r: r["score"])
        assert t["best_match"]["train_key"] == expected["train_key"]
        assert t["best_match"]["score"] == pytest.approx(expected["score"])
    page = (history / "reports" / "tiny-sd" / "report.html").read_text()
    assert "<h2>Memorisation scores</h2>" in page and "<h2>Memorised prompts</h2>" in page
    assert all(t["prompt"] in page for t in top) and top[0]["best_match"]["train_key"] in page

    # a second night, the same weights named otherwise: every prompt scores the same as before
    second = [*argv[:6], "--name", "tiny-sd-again", *argv[6:], "--no-report"]
    assert nightly.JOB.main(second) == 0
    again = json.loads((history / "regression" / "tiny-sd-again.json").read_text())["memorization_score"]
    assert again["vs_previous"]["checkpoint"] == "tiny-sd" and again["vs_previous"]["shared_prompts"] == 5
    assert abs(again["vs_previous"]["mean_change"]) < 1e-4 * scores["distribution"]["mean"]
