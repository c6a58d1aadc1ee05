"""bench.decode_fanout, the GPU machine's check of the decode fan-out rule (it has no Ray), run here on the CPU:
decode processes feed img2dataset's shards to the packaged model through memory-mapped slots, and the JSON
holds the rates and the streams the rule keeps."""

from __future__ import annotations

import json


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
