"""Online latency split by content repetition (analysis/repeats.py)."""

import pytest

from analysis import AnalysisError
from analysis.repeats import documents, occurrence_labels, repeat_table, run_labels

SOURCES = ["mi:doc1:instr1", "mi:doc2:instr4", "mi:doc1:instr2", "md:doc1,doc3",
           "md:doc3,doc2", "standin:cnn:17"]


def test_documents_are_read_from_the_source_field_after_the_kind():
    assert documents("multi-instruction-long:doc68:instr6") == ("doc68",)
    assert documents("multi-document:doc24,doc38") == ("doc24", "doc38")
    assert documents("standin:cnn:17") == ()
    assert documents("") == () and documents(None) == ()


def test_labels_follow_sending_order():
    assert occurrence_labels(SOURCES) == ["first", "first", "repeat", "partial", "repeat",
                                          "unknown"]


def test_run_labels_cycle_the_workload_and_skip_failed_requests():
    run = {"num_requests": 8, "ok_requests": [0, 2, 6, 7], "ttfts_ms": [1, 2, 3, 4],
           "failed": 4}
    # request 6 is workload request 0 again (doc1, seen), 7 is request 1 (doc2, seen)
    assert run_labels(run, SOURCES) == ["first", "repeat", "repeat", "repeat"]
    old = {"num_requests": 3, "ttfts_ms": [1, 2], "failed": 1}  # no ok_requests: unalignable
    assert run_labels(old, SOURCES) is None
    with pytest.raises(AnalysisError, match="no requests"):
        run_labels(run, [])


def test_repeat_table_groups_ttft_by_label():
    runs = [{"run_id": f"r{i}", "use_case": "mi", "arm": "sequence", "request_rate": 0.3,
             "num_requests": 3, "failed": 0, "ttfts_ms": [1000.0 + i, 200.0, 2000.0 + i],
             "e2els_ms": [5000.0, 3000.0, 6000.0]} for i in range(2)]
    df = repeat_table(runs, lambda r: ["mi:doc1:a", "mi:doc1:b", "mi:doc2:a"])
    got = {row.label: row for row in df.itertuples()}
    assert list(df["label"]) == ["first", "repeat"]
    assert got["repeat"].requests == 2 and got["repeat"].median_ttft_ms == 200.0
    assert got["first"].requests == 4 and got["first"].runs == 2
    assert got["first"].median_ttft_ms == pytest.approx(1500.5)
    assert repeat_table(runs, lambda r: None).empty
