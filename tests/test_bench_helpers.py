"""The statistics and report plumbing of the benchmark scripts (the timings themselves are not tests)."""

import numpy as np

from bench import report
from bench.quality import bootstrap, point_metrics


def test_point_metrics_and_bootstrap_interval():
    rng = np.random.default_rng(1)
    y = np.array([1] * 30 + [0] * 30)
    p = np.clip(y * 0.6 + rng.normal(0.2, 0.2, 60), 0, 1)
    point = point_metrics(y, p, 0.5)
    ci = bootstrap(y, p, 0.5, rounds=300, seed=0)
    for name in ("sensitivity", "specificity", "roc_auc"):
        low, high = ci[name]
        assert low <= point[name] <= high and 0 <= low <= high <= 1
    assert point_metrics(np.array([1, 1, 0]), np.array([0.9, 0.2, 0.1]), 0.5) == {
        "sensitivity": 0.5, "specificity": 1.0, "roc_auc": 1.0}


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
