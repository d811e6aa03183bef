"""Reading the container's CPU limit, which sizes TensorFlow's thread pools in a pod."""

from serving.runner import _ratio


def test_cgroup_v2_cpu_max(tmp_path):
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    assert _ratio(tmp_path / "cpu.max") == 2.0
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _ratio(tmp_path / "cpu.max") is None


def test_cgroup_v1_cfs_quota(tmp_path):
    (tmp_path / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "cpu.cfs_period_us").write_text("100000\n")
    assert _ratio(tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us") == 1.5
    (tmp_path / "cpu.cfs_quota_us").write_text("-1\n")
    assert _ratio(tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us") is None


def test_missing_or_garbled_files_mean_no_limit(tmp_path):
    assert _ratio(tmp_path / "absent") is None
    (tmp_path / "cpu.max").write_text("garbage")
    assert _ratio(tmp_path / "cpu.max") is None
