"""bench.copy_detection's verdict figures, counted by hand."""

import pyarrow as pa

from bench.copy_detection import flag_metrics


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
