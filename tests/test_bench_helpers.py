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


def test_timed_passes_the_arguments_and_returns_the_result():
    seconds, out = report.timed(lambda a, *, b: a + b, 2, b=3)
    assert out == 5 and 0 <= seconds < 60


def test_publish_writes_title_machine_body_and_figures_then_the_json_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "DOC", tmp_path / "benchmarks.md")
    monkeypatch.setattr(report, "machine", lambda: "test machine")
    report.publish("quality", "Quality", "the table", {"auc": 0.9}, write=True, machine_note="; note")
    text = (tmp_path / "benchmarks.md").read_text()
    assert '## Quality\n\nMachine: test machine; note\n\nthe table\n\n```json\n{"auc": 0.9}\n```' in text
    assert capsys.readouterr().out.strip().splitlines()[-1] == '{"auc": 0.9}'
    report.publish("serve", "Serving", "other", {"x": 1}, write=False)
    assert "Serving" not in (tmp_path / "benchmarks.md").read_text()
