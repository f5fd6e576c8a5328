"""Bad-sample counts, the bad-fraction check and the report actor's bookkeeping (no Ray needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.data.report import (
    MIN_SEEN,
    REASONS,
    DataQualityError,
    DataReport,
    bad_fraction,
    check_bad_fraction,
    report_metrics,
    write_report,
)


def _counts(**kw) -> np.ndarray:
    c = np.zeros(len(REASONS), dtype=np.int64)
    for r, n in kw.items():
        c[REASONS.index(r)] = n
    return c


def test_fraction_leaves_small_classes_out():
    assert bad_fraction(_counts(corrupt_image=2, small_class=50), 100) == 0.02
    assert bad_fraction(_counts(), 0) == 0.0


def test_check_waits_for_min_seen_then_names_files():
    items = [(f"/d/train-{i:06d}.tar", f"k{i}", "corrupt_image") for i in range(7)]
    check_bad_fraction(_counts(corrupt_image=7), MIN_SEEN - 1, 0.01, items)  # too early to judge
    check_bad_fraction(_counts(corrupt_image=2), MIN_SEEN, 0.01, items)  # 1% is not above 1%
    with pytest.raises(DataQualityError) as err:
        check_bad_fraction(_counts(corrupt_image=7, missing_label=1), MIN_SEEN, 0.01, items)
    msg = str(err.value)
    assert "4.0% of the 200" in msg and "corrupt_image 7, missing_label 1" in msg
    assert "/d/train-000000.tar" in msg and "and 2 more" in msg and "max_bad_fraction=0.01" in msg


def test_report_counts_items_and_writes_json(tmp_path):
    rep = DataReport()
    rep.add([("/a.tar", "k1", "unknown_label")], seen=10)
    assert rep.add_decode_failures([("/a.tar", "k2", "corrupt_image")]) == 1
    rep.add_unused([5, 6])
    rep.add([], seen=7, resumed_skip=3)  # totals only grow: a late push does not undo a newer one
    got = rep.fetch()
    assert got["counts"]["unknown_label"] == 1 and got["counts"]["corrupt_image"] == 1 and got["bad_total"] == 2
    assert got["samples_seen"] == 10 and got["resumed_skip"] == 3 and got["unused_ids"] == [5, 6]
    assert got["items"][1] == {"shard": "/a.tar", "key": "k2", "reason": "corrupt_image"}
    m = report_metrics(got)
    assert m["data/bad_unknown_label"] == 1 and m["data/bad_total"] == 2 and m["data/unused"] == 2
    assert m["data/samples_seen"] == 10 and m["data/bad_fraction"] == 0.2
    # Only the reasons that occurred get a metric; the totals always do.
    assert sorted(m) == ["data/bad_corrupt_image", "data/bad_fraction", "data/bad_total", "data/bad_unknown_label",
                         "data/resumed_skip", "data/samples_seen", "data/unused"]
    path = write_report(got, tmp_path / "r" / "data_report.json")
    assert json.loads(path.read_text()) == got
    with pytest.raises(ValueError, match="unknown bad-sample reason"):
        rep.add([("/a.tar", "k", "gremlins")])
