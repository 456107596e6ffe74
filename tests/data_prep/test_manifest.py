"""Manifest statistics are exact (nearest-rank percentiles in integer arithmetic)."""

import pytest

from data_prep.manifest import BuildStats, Distribution, make_manifest


def test_distribution_summary():
    d = Distribution()
    for v in range(1, 11):
        d.add(v)
    assert d.summary() == {
        "count": 10,
        "total": 55,
        "min": 1,
        "max": 10,
        "mean": 5.5,
        "p50": 5,
        "p90": 9,
        "p99": 10,
    }
    assert Distribution().summary() == {"count": 0, "total": 0}


def test_manifest_refuses_counts_that_do_not_reconcile():
    stats = BuildStats()
    stats.add_written("text", [], 3, 10, 0, False)
    stats.add_rejected()
    with pytest.raises(AssertionError, match="inputs 2 != written 1 \\+ rejected 0"):
        make_manifest(
            build={},
            stats=stats,
            reject_counts={},
            shards=[{"samples": 1, "bytes": 1}],
            image_extension="jpg",
        )
    manifest = make_manifest(
        build={},
        stats=stats,
        reject_counts={"empty_text": 1},
        shards=[{"samples": 1, "bytes": 1}],
        image_extension="jpg",
    )
    assert manifest["counts"]["reconciled"] and manifest["rejects"]["empty_text"] == 1
