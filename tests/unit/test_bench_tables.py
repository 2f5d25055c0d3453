"""The docs' footprint, scrape and soak tables are made from their committed
result files (bench/doctables.py): a figure in docs/benchmarks.md is the one
its result file holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import doctables as tables  # noqa: E402


def test_the_committed_docs_tables_are_their_result_files():
    assert tables.stale() == [], "python3 bench/doctables.py rewrites them"


def test_a_changed_result_changes_the_table_and_the_check_says_which(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    for name in tables.TABLES:
        (results / f"{name}.json").write_text((tables.RESULTS / f"{name}.json").read_text())
    doc = tmp_path / "benchmarks.md"
    doc.write_text(tables.DOC.read_text())
    monkeypatch.setattr(tables, "RESULTS", results)
    assert tables.stale(doc) == []
    soak = json.loads((results / "soak.json").read_text())
    soak["load"]["bad_bytes"] = 3
    soak["passed"] = False
    (results / "soak.json").write_text(json.dumps(soak))
    assert tables.stale(doc) == ["soak"]
    assert tables.update("soak", doc)
    assert tables.stale(doc) == []
    text = doc.read_text()
    assert "| wrong bytes | 3 |" in text and "| result | **failed** |" in text
    # only the soak section changed
    assert (
        text.replace("| wrong bytes | 3 |", "| wrong bytes | 0 |").replace(
            "| result | **failed** |", "| result | passed |"
        )
        == tables.DOC.read_text()
    )


def test_a_doc_without_markers_is_not_touched(tmp_path):
    doc = tmp_path / "other.md"
    doc.write_text("# nothing to fill\n")
    assert not tables.update("footprint", doc)
    assert doc.read_text() == "# nothing to fill\n"
    assert tables.stale(doc) == list(tables.TABLES)
