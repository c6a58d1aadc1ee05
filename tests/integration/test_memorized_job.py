"""``copyscan memorized`` on a local Ray: an image folder with a manifest, one memorised prompt, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from copyscan.indexing.read.fetch import fetch_images
from copyscan.indexing.read.images import open_rgb
from copyscan.search.memorized.discover import MEMORIZED_SCHEMA, memorized_for_report
from copyscan.search.verify.pixel import align


def _write(folder: Path, name: str, x: np.ndarray) -> str:
    Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(folder / name, quality=90)
    return name


def test_memorized_job_flags_the_memorised_prompt_and_resumes(ray_session, real_images, tmp_path):
    from copyscan.jobs import memorized as job

    rng = np.random.default_rng(5)
    folder = tmp_path / "gens"
    folder.mkdir()
    rows = []
    base = align(open_rgb(real_images[10]), 192).astype(np.float32)
    for i in range(12):  # prompt 0: 12 near-identical generations and 3 different ones
        x = base * rng.uniform(0.97, 1.03) + rng.normal(0, 5.0, base.shape)
        rows.append({"path": _write(folder, f"p0_{i:02d}.jpg", x), "prompt": "memorised prompt"})
    others = iter(real_images[11:])
    for i in range(3):
        rows.append(
            {
                "path": _write(folder, f"p0_x{i}.jpg", align(open_rgb(next(others)), 192)),
                "prompt": "memorised prompt",
            }
        )
    for p in range(1, 6):  # five prompts of varied generations
        for i in range(6):
            name = _write(folder, f"p{p}_{i}.jpg", align(open_rgb(next(others)), 192))
            rows.append({"path": name, "prompt": f"prompt {p}"})
    rows.append({"path": "missing.jpg", "prompt": "prompt 1"})
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")

    out = str(tmp_path / "out")
    args = ["--generations", str(folder), "--out", out, "prompts_per_task=2", "max_in_flight=2"]
    assert job.JOB.main(args) == 0
    summary = json.loads((Path(out) / "summary.json").read_text())
    assert summary["prompts"] == 6 and summary["generations"] == len(rows) and summary["flagged"] == 1
    assert summary["tasks_total"] == 3 and summary["errors"] == {"source_unreadable": 1}
    table = pq.read_table(Path(out) / "memorized.parquet")
    assert table.schema.equals(MEMORIZED_SCHEMA)
    top = table.to_pylist()[0]
    assert (
        top["prompt"] == "memorised prompt"
        and top["flagged"]
        and top["clique_size"] == 12
        and top["rank"] == 0
    )
    assert sorted(top["clique_keys"]) == [f"p0_{i:02d}.jpg" for i in range(12)]
    assert not any(r["flagged"] for r in table.to_pylist()[1:])

    report = memorized_for_report(out)
    assert [r["prompt"] for r in report] == ["memorised prompt"] and report[0]["edge_threshold"] == 0.08
    members = report[0]["members"]
    fetched = fetch_images([(m["source"], m["key"]) for m in members])
    assert all(f.data for f in fetched.values()) and len(fetched) == 12
    # the HTML report's section: every clique member inlined, the prompt as text
    from copyscan.search.report import html
    from copyscan.search.report.gallery import thumbnails

    thumbs = thumbnails([(m["source"], m["key"]) for m in members], 64)
    section = html.memorized_section(out, report, thumbs, per_prompt=16)
    assert section.count('<img src="data:image/jpeg;base64,') == 12 and "memorised prompt" in section
    assert "clique of 12 among 15 generations" in section

    # resume: nothing to do; a task whose marker is lost is redone, and only that one
    assert job.JOB.main(args) == 0
    assert json.loads((Path(out) / "summary.json").read_text())["this_run"]["tasks"] == 0
    (Path(out) / "tasks" / "task_00001.json").unlink()
    assert job.JOB.main(args) == 0
    redone = json.loads((Path(out) / "summary.json").read_text())
    assert redone["this_run"]["tasks"] == 1 and redone["flagged"] == 1
    assert pq.read_table(Path(out) / "memorized.parquet").equals(table)
    # changed settings are refused on resume
    assert job.JOB.main([*args, "edge_threshold=0.1"]) == 2

    # the driver SIGKILLed once its first task is written, then run again: the clean run's result
    from test_faults import Driver, _more

    killed_out = tmp_path / "killed"
    killed_args = ["--generations", str(folder), "--out", str(killed_out), *args[4:]]
    driver = Driver(tmp_path / "killed.log", "copyscan.jobs.memorized", *killed_args)
    driver.wait_for(_more(killed_out / "tasks", "task_*.json"), "a task written")
    driver.kill()
    assert not (killed_out / "summary.json").exists()
    assert job.JOB.main(killed_args) == 0
    resumed = json.loads((killed_out / "summary.json").read_text())
    assert resumed["this_run"]["tasks"] < 3 and resumed["flagged"] == 1
    assert pq.read_table(killed_out / "memorized.parquet").equals(table)
