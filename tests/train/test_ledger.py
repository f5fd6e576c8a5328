"""pipeline.train.ledger: lines per trained step, and the replay that discards redone steps."""

from __future__ import annotations

from pipeline.train.ledger import SampleLedger, audit, read_ledger


def _attempt(tmp_path, token, started, resumed_from, steps, ids_of, ranks=(0, 1)):
    for rank in ranks:
        led = SampleLedger(str(tmp_path), rank, token, started, resumed_from)
        led.pid = led.pid * 10 + len(token) * 100 + rank  # distinct "processes" in one test process
        for s in steps:
            led.write(s, ids_of(rank, s))
        led.close()


def test_audit_discards_the_steps_a_later_attempt_redid(tmp_path):
    ids = lambda rank, s: [1000 * s + 10 * rank + k for k in range(4)]  # noqa: E731
    _attempt(tmp_path, "a1", 100.0, 0, range(1, 8), ids)             # killed after step 7
    redo = lambda rank, s: [1000 * s + 10 * rank + k + 5 for k in range(4)]  # noqa: E731
    _attempt(tmp_path, "a22", 200.0, 4, range(5, 11), redo)           # resumed from the checkpoint of step 4
    rows = read_ledger(tmp_path)
    assert {r["attempt"] for r in rows} == {0, 1}
    out = audit(tmp_path)
    assert out["steps_per_rank"] == {0: list(range(1, 11)), 1: list(range(1, 11))}
    assert sorted({r["step"] for r in out["discarded"]}) == [5, 6, 7] and len(out["discarded"]) == 6
    assert out["samples"] == 10 * 2 * 4 == out["unique"] and out["duplicates"] == {}
    assert out["attempts"] == [{"attempt": 0, "resumed_from": 0, "steps": (1, 7), "lines": 14},
                               {"attempt": 1, "resumed_from": 4, "steps": (5, 10), "lines": 12}]


def test_audit_reports_a_sample_trained_twice_in_one_pass(tmp_path):
    _attempt(tmp_path, "a1", 1.0, 0, range(1, 4), lambda rank, s: [10 * s + rank, 100 + rank])
    out = audit(tmp_path)
    assert out["duplicates"] == {(0, 100): 3, (0, 101): 3}  # keyed (pass, sample id)


def test_the_same_sample_in_two_passes_is_no_duplicate(tmp_path):
    led = SampleLedger(str(tmp_path), 0, "a1", 1.0, 0)
    led.write(1, [7, 8], [3, 3], pass_index=0)
    led.write(2, [7, 8], [3, 3], pass_index=1)
    led.close()
    out = audit(tmp_path)
    assert out["duplicates"] == {} and out["unique"] == 4
    assert [r["labels"] for r in read_ledger(tmp_path)] == [[3, 3], [3, 3]]


def test_a_torn_last_line_is_skipped(tmp_path):
    _attempt(tmp_path, "a1", 1.0, 0, range(1, 3), lambda rank, s: [s], ranks=(0,))
    (path,) = tmp_path.glob("rank0-*.jsonl")
    with open(path, "a") as f:
        f.write('{"rank": 0, "pid": 1, "att')
    assert [r["step"] for r in read_ledger(tmp_path)] == [1, 2]
