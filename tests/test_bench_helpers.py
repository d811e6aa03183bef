"""The report plumbing of the benchmark scripts (the timings themselves are not tests).

The bootstrap the quality benchmark uses is chest_ct.metrics', tested in test_eval_report.
"""

from bench import report


def test_write_section_replaces_only_its_own_block(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "DOC", tmp_path / "benchmarks.md")
    report.write_section("train", "first")
    report.write_section("serve", "other")
    report.write_section("train", "second")
    text = (tmp_path / "benchmarks.md").read_text()
    assert "second" in text and "first" not in text and "other" in text
    assert text.count("<!-- bench:train -->") == 1


def test_table_layout():
    lines = report.table(["a", "bb"], [[1.23456, "x"], [123.4, "yy"]]).splitlines()
    assert lines[0] == "| a     | bb |" and lines[2] == "| 1.235 | x  |" and lines[3] == "| 123.4 | yy |"
