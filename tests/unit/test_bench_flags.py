"""bench.copy_detection's verdict figures, counted by hand; the options and summary of the multi-domain benches."""

import argparse

import pyarrow as pa
import pytest

from bench import domains
from bench.copy_detection import flag_metrics, parse_embedder


def test_flags_count_right_wrong_and_false_verdicts():
    truth = [
        {"file": "c1", "is_copy": True, "source_image": "s1"},
        {"file": "c2", "is_copy": True, "source_image": "s2"},
        {"file": "c3", "is_copy": True, "source_image": "s3"},
        {"file": "n1", "is_copy": False, "source_image": None},
        {"file": "n2", "is_copy": False, "source_image": None},
    ]
    key_of_source = {"s1": "k1", "s2": "k2", "s3": "k3"}
    table = pa.table(
        {
            "query_id": ["c1", "c1", "c2", "c3", "n1", "n2"],
            "train_key": ["k1", "k9", "k7", "k3", "k5", "k6"],
            "rank": [0, None, 0, 0, 0, 0],
            # c1 whole copy found; c2 flagged on a wrong image; n1 a false flag
            "is_copy": [True, None, True, False, True, False],
            # c1's partial answer another image; c3 found only as a partial copy
            "is_partial_copy": [None, True, None, True, None, False],
        }
    )
    flags = flag_metrics(table, truth, key_of_source)
    assert flags["is_copy"] == {
        "flagged": 3,
        "right": 1,
        "wrong_source": 1,
        "false_flags": 1,
        "recall": 1 / 3,
        "false_positive_rate": 0.5,
        "precision": 1 / 3,
        "precision_at_50pct": (1 / 3) / (1 / 3 + 1 / 3 + 0.5),
    }
    assert (flags["is_partial_copy"]["right"], flags["is_partial_copy"]["wrong_source"]) == (1, 1)
    # either: c1 (its source among its flags), c3 right, c2 wrong, n1 false
    assert {k: flags["either"][k] for k in ("flagged", "right", "wrong_source", "false_flags")} == {
        "flagged": 4,
        "right": 2,
        "wrong_source": 1,
        "false_flags": 1,
    }
    # a scan without a partial threshold: no is_partial_copy or either entry
    unset = table.set_column(4, "is_partial_copy", pa.nulls(6, pa.bool_()))
    assert set(flag_metrics(unset, truth, key_of_source)) == {"is_copy"}
    # a verified scan's is_copy is on its answer, verify_rank 0: c1's row of rank 1 (k1) is right there
    verified = unset.append_column("verify_rank", pa.array([None, 0, 0, 0, 0, 0], pa.int32()))
    verified = verified.set_column(1, "train_key", pa.array(["k9", "k1", "k7", "k3", "k5", "k6"]))
    verified = verified.set_column(3, "is_copy", pa.array([False, True, True, False, True, False]))
    flags = flag_metrics(verified, truth, key_of_source, "verify_rank")["is_copy"]
    assert (flags["flagged"], flags["right"], flags["wrong_source"], flags["false_flags"]) == (3, 1, 1, 1)
    assert flag_metrics(verified, truth, key_of_source)["is_copy"]["right"] == 0  # rank 0 is k9 there


def test_domain_seed_and_embedder_options():
    parser = argparse.ArgumentParser()
    domains.add_arguments(parser)
    args = parser.parse_args(["--domain", "all", "--seed", "0", "1"])
    assert domains.domains(args.domain) == ["art", "icons", "screenshots"] and args.seed == [0, 1]
    assert domains.domains(parser.parse_args([]).domain) == ["art"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--domain", "openclipart"])
    # the default domain keeps the work folder it had before domains; the others get their own
    assert domains.work_dir(None, "art", 300, 100).name == "copy_detection-300-100"
    assert domains.work_dir(None, "icons", 300, 100).name == "copy_detection-icons-300-100"
    assert (
        str(domains.work_dir("/w", "art", 1, 1)) == "/w"
        and str(domains.work_dir("/w", "icons", 1, 1)) == "/w/icons"
    )
    # the default embedder adds no index override (its index is the one built without --embedder)
    assert parse_embedder("effnet-lite0") == ("effnet-lite0", [])
    assert parse_embedder("sscd=/m/sscd.onnx") == (
        "sscd (sscd.onnx)",
        ["embedder=sscd", "weights=/m/sscd.onnx"],
    )
    with pytest.raises(SystemExit, match="unknown embedder 'resnet'"):
        parse_embedder("resnet=/m/r.pt")


def test_summary_per_domain_with_seed_spread_and_mean():
    def run(label, domain, seed, recall, ap):
        return {"embedder_label": label, "domain": domain, "seed": seed, "recall@1": recall,
                "score": {"ap": ap}, "score_norm": {"ap": ap + 0.01}}  # fmt: skip

    runs = [
        run("effnet-lite0", "art", 0, 0.9, 0.8),
        run("effnet-lite0", "art", 1, 0.8, 0.7),
        run("effnet-lite0", "icons", 0, 0.6, 0.5),
        run("sscd (x.onnx)", "art", 0, 1.0, 0.9),
    ]
    summary = domains.summarise(runs)
    art = summary["effnet-lite0"]["domains"]["art"]
    assert art["recall@1"]["seeds"] == {"0": 0.9, "1": 0.8}
    assert abs(art["recall@1"]["mean"] - 0.85) < 1e-12 and abs(art["recall@1"]["spread"] - 0.1) < 1e-12
    assert summary["effnet-lite0"]["domains"]["icons"]["AP score"]["spread"] == 0.0
    # the mean over domains is of the per-domain means: art's two seeds weigh as much as icons' one
    assert abs(summary["effnet-lite0"]["mean"]["recall@1"] - (0.85 + 0.6) / 2) < 1e-12
    assert abs(summary["effnet-lite0"]["mean"]["AP score_norm"] - (0.76 + 0.51) / 2) < 1e-12
    assert summary["sscd (x.onnx)"]["mean"]["recall@1"] == 1.0
    text = domains.table(summary).splitlines()
    assert text[0] == "| embedder | domain | recall@1 | AP score | AP score_norm |"
    assert (
        "| effnet-lite0 | art | 0.850 (0.900 / 0.800) | 0.750 (0.800 / 0.700) | 0.760 (0.810 / 0.710) |"
        in text
    )
    assert "| effnet-lite0 | **mean** | 0.725 | 0.625 | 0.635 |" in text
    assert "| sscd (x.onnx) | art | 1.000 | 0.900 | 0.910 |" in text


def test_partial_copies_summary_reads_the_region_figures():
    from bench import partial_copies

    run = {"embedder": "effnet-lite0", "domain": "icons", "seed": 0, "recall@1": 0.05,
           "score_norm": {"ap": 0.01}, "local_score_norm": {"recall@1": 0.7, "ap": 0.6}}  # fmt: skip
    summary = partial_copies.bench_domains.summarise([run], partial_copies.FIGURES, lambda r: r["embedder"])
    icons = summary["effnet-lite0"]["domains"]["icons"]
    assert icons["local recall@1"]["mean"] == 0.7 and icons["AP local_score_norm"]["mean"] == 0.6
    assert "dense recall@1" not in icons  # a scan without dense verification has no such figure
    assert (
        "| effnet-lite0 | icons | 0.050 | 0.010 | 0.700 | 0.600 |  |  |"
        in partial_copies.bench_domains.table(summary, partial_copies.FIGURES)
    )
