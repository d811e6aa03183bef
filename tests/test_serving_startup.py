"""``python -m serving`` refuses to start, quickly and with a clear one-line reason, on an unusable model dir.

Cases that the entry point rejects before TensorFlow is imported also run
in-process through ``serving.__main__.main`` (the same code path, without
paying ~2 s of interpreter start-up per case); the real command line is
exercised as a subprocess for a representative set.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.serving_helpers import exported_model, run_server_expecting_failure


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return exported_model(str(tmp_path_factory.getbasetemp() / "serving"))


def _metadata(model_dir: Path) -> dict:
    return json.loads((model_dir / "model_metadata.json").read_text())


def _linked_model(model_dir: Path, target: Path, metadata: dict | None) -> Path:
    """A model dir whose SavedModel files are symlinks to the real export (no 100 MB copies)."""
    target.mkdir(parents=True)
    for name in ("saved_model.pb", "variables", "assets", "fingerprint.pb"):
        if (model_dir / name).exists():
            os.symlink(model_dir / name, target / name)
    if metadata is not None:
        (target / "model_metadata.json").write_text(json.dumps(metadata))
    return target


def _tiny_saved_model(
    target: Path,
    metadata: dict,
    *,
    with_pixels: bool,
    probability: float,
    with_hu: bool = True,
    with_guard: bool = True,
) -> Path:
    """A small SavedModel with the right input names, for the signature and warm-up checks."""
    import tensorflow as tf

    def outputs(n):
        out = {"probability": tf.fill(n, probability)}
        if with_guard:
            out.update(ood_score=tf.fill(n, 0.5), in_distribution=tf.fill(n, True))
        return out

    class Tiny(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def images(self, images):
            return outputs(tf.shape(images))

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="pixels")])
        def pixels(self, pixels):
            return outputs(tf.shape(pixels)[:1])

        @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32, name="hu")])
        def hu(self, hu):
            return outputs(tf.shape(hu)[:1])

    module = Tiny()
    signatures = {"serving_default": module.images}
    if with_pixels:
        signatures["serve_pixels"] = module.pixels
    if with_hu:
        signatures["serve_hu"] = module.hu
    tf.saved_model.save(module, str(target), signatures=signatures)
    (target / "model_metadata.json").write_text(json.dumps(metadata))
    return target


def _exit_message(monkeypatch, *argv: str) -> str:
    """Run ``serving.__main__.main(argv)`` in-process; it must exit with a message before serving."""
    monkeypatch.setattr(sys, "argv", ["serving"])  # kserve parses sys.argv when first imported
    from serving.__main__ import main

    with pytest.raises(SystemExit) as caught:
        main(list(argv))
    assert isinstance(caught.value.code, str), caught.value.code
    return caught.value.code


def _fails_with(proc, *texts: str) -> None:
    assert proc.returncode == 1, f"expected exit 1, got {proc.returncode}\n{proc.stderr[-3000:]}"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("chest-ct serving:"), last
    for text in texts:
        assert text in last, f"{text!r} not in {last!r}"


def test_missing_model_dir(tmp_path):
    _fails_with(run_server_expecting_failure(tmp_path / "nope"), "does not exist")


def test_model_dir_is_a_file(tmp_path, monkeypatch):
    path = tmp_path / "model.h5"
    path.write_bytes(b"not a directory")
    assert "is not a directory" in _exit_message(monkeypatch, "--model_dir", str(path))


def test_model_dir_is_a_uri(monkeypatch):
    message = _exit_message(monkeypatch, "--model_dir", "s3://bucket/model")
    assert "is a URI" in message and "storageUri" in message


def test_directory_that_is_not_a_saved_model(tmp_path, model_dir):
    (tmp_path / "model_metadata.json").write_text(json.dumps(_metadata(model_dir)))
    _fails_with(run_server_expecting_failure(tmp_path), "not a TensorFlow SavedModel", "saved_model.pb")


def test_saved_model_without_metadata(tmp_path, model_dir):
    _fails_with(
        run_server_expecting_failure(_linked_model(model_dir, tmp_path / "m", None)),
        "no model_metadata.json",
        "threshold",
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"threshold": 1.5}, "'threshold' must be a number between 0 and 1"),
        ({"threshold": None}, "'threshold' must be a number between 0 and 1"),
        ({"class_names": ["normal"]}, "'class_names' must be two different non-empty strings"),
        ({"positive_class": "cancer"}, "'positive_class' must be one of"),
        ({"image_size": "224"}, "'image_size' must be a positive integer"),
        ({"mlflow_run_id": 42}, "'mlflow_run_id' must be a string"),
        ({"ood": None}, "'ood' must hold the out-of-distribution guard's numeric 'threshold'"),
        ({"ood": {"threshold": "high"}}, "'ood' must hold the out-of-distribution guard's numeric 'threshold'"),
        ({"window": {"level": -600}}, "'window' must hold the numeric 'level' and 'width'"),
    ],
    ids=[
        "threshold_out_of_range",
        "threshold_null",
        "one_class",
        "unknown_positive_class",
        "image_size_string",
        "run_id_not_string",
        "no_guard",
        "guard_threshold_text",
        "window_without_width",
    ],
)
def test_invalid_metadata(tmp_path, model_dir, monkeypatch, change, message):
    meta = {**_metadata(model_dir), **change}
    target = _linked_model(model_dir, tmp_path / "m", meta)
    assert message in _exit_message(monkeypatch, "--model_dir", str(target))


def test_metadata_missing_keys(tmp_path, model_dir, monkeypatch):
    meta = {k: v for k, v in _metadata(model_dir).items() if k not in ("image_size", "threshold")}
    target = _linked_model(model_dir, tmp_path / "m", meta)
    assert "lacks 'image_size', 'threshold'" in _exit_message(monkeypatch, "--model_dir", str(target))


def test_metadata_not_json(tmp_path, model_dir, monkeypatch):
    target = _linked_model(model_dir, tmp_path / "m", None)
    (target / "model_metadata.json").write_text("{threshold: 0.5")
    assert "not readable JSON" in _exit_message(monkeypatch, "--model_dir", str(target))


def test_corrupt_saved_model(tmp_path, model_dir):
    target = tmp_path / "m"
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("variables"))
    (target / "saved_model.pb").write_bytes(b"\x00garbage, not a protobuf" * 10)
    _fails_with(run_server_expecting_failure(target), "TensorFlow cannot load the SavedModel")


def test_saved_model_without_the_pixels_signature(tmp_path, model_dir, monkeypatch):
    target = _tiny_saved_model(tmp_path / "m", _metadata(model_dir), with_pixels=False, probability=0.5)
    assert "no 'serve_pixels' signature" in _exit_message(monkeypatch, "--model_dir", str(target))


def test_saved_model_without_the_hu_signature(tmp_path, model_dir, monkeypatch):
    target = _tiny_saved_model(tmp_path / "m", _metadata(model_dir), with_pixels=True, with_hu=False, probability=0.5)
    assert "no 'serve_hu' signature" in _exit_message(monkeypatch, "--model_dir", str(target))


def test_saved_model_without_the_guard_outputs_is_refused(tmp_path, model_dir, monkeypatch):
    """A model exported before the out-of-distribution guard would answer for anything: not served."""
    target = _tiny_saved_model(
        tmp_path / "m", _metadata(model_dir), with_pixels=True, with_guard=False, probability=0.5
    )
    message = _exit_message(monkeypatch, "--model_dir", str(target))
    assert "must return ['probability', 'ood_score', 'in_distribution']" in message and "re-export" in message


def test_model_failing_its_warm_up_call_never_becomes_ready(tmp_path, model_dir, monkeypatch):
    target = _tiny_saved_model(tmp_path / "m", _metadata(model_dir), with_pixels=True, probability=2.0)
    message = _exit_message(monkeypatch, "--model_dir", str(target))
    assert "warm-up call" in message and "[0, 1]" in message


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "2"], "--workers must be 1"),
        (["--max_batch_size", "0"], "max_batch_size=0"),
        (["--max_request_bytes", "10"], "max_request_bytes=10"),
        (["--max_queued_images", "0"], "max_queued_images=0"),
        (["--deadline_ms", "0"], "deadline_ms=0.0"),
        (["--model_call_timeout_s", "-1"], "model_call_timeout_s=-1.0"),
    ],
    ids=["workers", "batch_size", "request_bytes", "queued_images", "deadline", "watchdog"],
)
def test_invalid_server_flags(model_dir, monkeypatch, args, message):
    assert message in _exit_message(monkeypatch, "--model_dir", str(model_dir), *args)


def test_workers_flag_on_the_command_line(model_dir):
    _fails_with(run_server_expecting_failure(model_dir, "--workers", "3"), "--workers must be 1")


def test_model_dir_from_environment(tmp_path, monkeypatch):
    """MODEL_DIR is the default for --model_dir (what Dockerfile.serve sets to /mnt/models)."""
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "from-env"))
    monkeypatch.setattr(sys, "argv", ["serving"])
    from serving.__main__ import build_parser

    assert build_parser().parse_args([]).model_dir == str(tmp_path / "from-env")
    assert build_parser().parse_args([]).model_name == "chest-ct"


def test_limits_can_be_set_by_environment(monkeypatch):
    """An InferenceService can tune the limits through env without replacing the container args."""
    monkeypatch.setattr(sys, "argv", ["serving"])
    from serving.__main__ import build_parser

    monkeypatch.setenv("CHEST_CT_MAX_REQUEST_BYTES", "2097152")
    monkeypatch.setenv("CHEST_CT_MAX_BATCH_WAIT_MS", "2.5")
    args = build_parser().parse_args([])
    assert args.max_request_bytes == 2097152 and args.max_batch_wait_ms == 2.5
    assert build_parser().parse_args(["--max_request_bytes", "4096"]).max_request_bytes == 4096  # flag wins
    monkeypatch.setenv("CHEST_CT_MAX_IMAGES", "lots")
    with pytest.raises(SystemExit, match="CHEST_CT_MAX_IMAGES='lots' is not a number"):
        build_parser()


def test_every_limit_is_a_flag_with_an_environment_variable(monkeypatch):
    """One place per default: ServerConfig's fields are the flags, CHEST_CT_<NAME> their environment defaults."""
    from dataclasses import fields

    monkeypatch.setattr(sys, "argv", ["serving"])
    from serving.__main__ import build_parser
    from serving.config import ServerConfig, env_name, from_args

    parser = build_parser()
    assert from_args(parser.parse_args([])) == ServerConfig()
    help_text = " ".join(parser.format_help().split())
    for f in fields(ServerConfig):
        assert f"--{f.name}" in help_text and env_name(f.name) in help_text, f.name
    monkeypatch.setenv("CHEST_CT_MAX_QUEUED_IMAGES", "12")
    monkeypatch.setenv("CHEST_CT_DEADLINE_MS", "2500")
    config = from_args(build_parser().parse_args(["--max_queued_pixels", "1000"]))
    assert (config.max_queued_images, config.deadline_ms, config.max_queued_pixels) == (12, 2500.0, 1000)
