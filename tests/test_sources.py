import io
import threading
import time
import zipfile
from pathlib import Path

import boto3
import pytest

from chest_ct.archive import UnsafeArchiveError
from chest_ct.sources import DataSourceError, drive_file_id, fetch, fetch_dataset
from tests.conftest import write_dataset

FILE_ID = "1z0mreUtRmR-P-magILsDR3T7M6IkGXtY"


@pytest.mark.parametrize(
    "uri",
    [
        f"gdrive://{FILE_ID}",
        f"https://drive.google.com/file/d/{FILE_ID}/view?usp=sharing",
        f"https://drive.google.com/uc?id={FILE_ID}&export=download",
        f"https://drive.google.com/open?id={FILE_ID}",
    ],
)
def test_drive_file_id_forms(uri):
    assert drive_file_id(uri) == FILE_ID


def test_drive_uri_without_id():
    with pytest.raises(DataSourceError, match="cannot find a Google Drive file id"):
        drive_file_id("https://drive.google.com/drive/my-drive")


@pytest.mark.parametrize(
    "uri, message",
    [
        ("ftp://host/data.zip", "unsupported scheme 'ftp'"),
        ("gs://bucket/data.zip", "unsupported scheme 'gs'"),
        ("", "data_uri is empty"),
        ("/no/such/dataset", "does not exist"),
    ],
)
def test_bad_uris(tmp_path, uri, message):
    with pytest.raises(DataSourceError, match=message):
        fetch(uri, tmp_path)


def test_local_file_that_is_not_a_zip(tmp_path):
    f = tmp_path / "data.tar"
    f.write_bytes(b"nope")
    with pytest.raises(DataSourceError, match="neither a folder nor a zip"):
        fetch(str(f), tmp_path / "work")


def zipped(folder: Path, wrapper: str = "Data") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in folder.rglob("*"):
            if f.is_file():
                zf.write(f, f"{wrapper}/{f.relative_to(folder)}")
    return buf.getvalue()


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "src", {"train": {"adenocarcinoma": 2, "normal": 2}})


def test_local_folder_is_used_in_place(tmp_path, small_dataset):
    assert fetch(str(small_dataset), tmp_path / "work") == small_dataset
    assert fetch(small_dataset.as_uri(), tmp_path / "work") == small_dataset
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir()), "nothing copied"


def test_local_zip_is_extracted(tmp_path, small_dataset):
    archive = tmp_path / "data.zip"
    archive.write_bytes(zipped(small_dataset))
    root = fetch(str(archive), tmp_path / "work")
    assert sorted(p.name for p in (root / "Data" / "train").iterdir()) == ["adenocarcinoma", "normal"]


def test_gdrive_goes_through_gdown_up_to_the_network(tmp_path, small_dataset, monkeypatch):
    """Drive is unreachable here: replace only gdown's network call and check what reaches it."""
    import gdown

    calls = []

    def fake_download(*, id, output, quiet):
        calls.append(id)
        Path(output).write_bytes(zipped(small_dataset))
        return output

    monkeypatch.setattr(gdown, "download", fake_download)
    root = fetch(f"https://drive.google.com/file/d/{FILE_ID}/view?usp=sharing", tmp_path / "work")
    assert calls == [FILE_ID]
    assert (root / "Data" / "train" / "normal").is_dir()


def test_gdrive_failure_names_the_uri(tmp_path, monkeypatch):
    import gdown

    def failing(**_):
        raise ConnectionError("Failed to resolve 'drive.google.com'")

    monkeypatch.setattr(gdown, "download", failing)
    with pytest.raises(DataSourceError, match=f"gdrive://{FILE_ID}.*download of file {FILE_ID} failed.*resolve"):
        fetch(f"gdrive://{FILE_ID}", tmp_path)


@pytest.fixture
def s3(s3_endpoint, aws_credentials):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="datasets")
    yield client
    for obj in client.list_objects_v2(Bucket="datasets").get("Contents", []):
        client.delete_object(Bucket="datasets", Key=obj["Key"])
    client.delete_bucket(Bucket="datasets")


def test_s3_zip_object(tmp_path, s3, s3_endpoint, small_dataset):
    s3.put_object(Bucket="datasets", Key="chest/ct.zip", Body=zipped(small_dataset))
    root = fetch("s3://datasets/chest/ct.zip", tmp_path / "work", s3_endpoint_url=s3_endpoint)
    assert len(list(root.rglob("*.png"))) == 4


def test_s3_prefix_folder_with_endpoint_from_env(tmp_path, s3, s3_endpoint, small_dataset, monkeypatch):
    for f in small_dataset.rglob("*.png"):
        s3.put_object(Bucket="datasets", Key=f"ct/v1/{f.relative_to(small_dataset).as_posix()}", Body=f.read_bytes())
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    root = fetch("s3://datasets/ct/v1", tmp_path / "work")
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")) == sorted(
        p.relative_to(small_dataset).as_posix() for p in small_dataset.rglob("*.png")
    )


def test_s3_missing_object_and_empty_prefix(tmp_path, s3, s3_endpoint):
    with pytest.raises(DataSourceError, match="s3://datasets/nope.zip.*S3 download failed"):
        fetch("s3://datasets/nope.zip", tmp_path / "a", s3_endpoint_url=s3_endpoint)
    with pytest.raises(DataSourceError, match="no objects under s3://datasets/empty/"):
        fetch("s3://datasets/empty", tmp_path / "b", s3_endpoint_url=s3_endpoint)
    with pytest.raises(DataSourceError, match="S3 download failed"):
        fetch("s3://no-such-bucket/x.zip", tmp_path / "c", s3_endpoint_url=s3_endpoint)


def put_folder(s3, prefix: str, dataset: Path) -> list[str]:
    keys = []
    for f in sorted(dataset.rglob("*.png")):
        keys.append(f"{prefix}{f.relative_to(dataset).as_posix()}")
        s3.put_object(Bucket="datasets", Key=keys[-1], Body=f.read_bytes())
    return keys


def test_s3_keys_that_would_escape_the_folder_are_refused_and_listed(tmp_path, s3, s3_endpoint, small_dataset):
    good = put_folder(s3, "ct/v1/", small_dataset)
    hostile = {
        "ct/v1//etc/chest-ct-evil.png": "has an absolute path",  # old code wrote this to /etc/chest-ct-evil.png
        "ct/v1/../outside.png": "escapes its folder ('..')",
        "ct/v1/train/../../../outside2.png": "escapes its folder ('..')",
        "ct/v1/train\\..\\..\\outside3.png": "escapes its folder ('..')",
        f"ct/v1/{good[0][len('ct/v1/') :]}/inside-a-file.png": "clashes with another key",
    }
    for key in hostile:
        s3.put_object(Bucket="datasets", Key=key, Body=b"evil")
    work = tmp_path / "deep" / "work"
    fetched = fetch_dataset("s3://datasets/ct/v1/", work, s3_endpoint_url=s3_endpoint)
    refused = {r.key: r.reason for r in fetched.refused}
    assert set(refused) == set(hostile)
    assert all(refused[key].startswith(reason) for key, reason in hostile.items())
    assert fetched.downloaded_files == len(good) == 4
    on_disk = sorted(p.relative_to(fetched.root).as_posix() for p in fetched.root.rglob("*") if p.is_file())
    assert on_disk == sorted(k[len("ct/v1/") :] for k in good)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith("outside")] == []
    assert not Path("/etc/chest-ct-evil.png").exists()
    assert fetch("s3://datasets/ct/v1/", tmp_path / "again", s3_endpoint_url=s3_endpoint).is_dir(), (
        "fetch() still returns the folder"
    )


def test_s3_folder_of_refused_keys_only(tmp_path, s3, s3_endpoint):
    s3.put_object(Bucket="datasets", Key="bad//abs.png", Body=b"x")
    with pytest.raises(
        DataSourceError, match=r"no objects under s3://datasets/bad/ \(1 refused: 'bad//abs.png' has an absolute"
    ):
        fetch_dataset("s3://datasets/bad", tmp_path, s3_endpoint_url=s3_endpoint)


def test_s3_folder_file_cap_stops_before_downloading_the_rest(tmp_path, s3, s3_endpoint):
    for i in range(8):
        s3.put_object(Bucket="datasets", Key=f"many/f{i}.png", Body=b"x" * 10)
    with pytest.raises(
        UnsafeArchiveError, match=r"s3://datasets/many/: more than the cap of 3 files \(reached at 'many/f3.png'\)"
    ):
        fetch_dataset("s3://datasets/many", tmp_path, s3_endpoint_url=s3_endpoint, max_files=3)
    assert len([p for p in tmp_path.rglob("*.png")]) <= 3


def test_s3_folder_byte_cap(tmp_path, s3, s3_endpoint):
    for i in range(4):
        s3.put_object(Bucket="datasets", Key=f"big/f{i}.png", Body=b"x" * 1000)
    with pytest.raises(
        UnsafeArchiveError, match=r"'big/f2.png' brings the total to 3000 bytes, more than the cap of 2500"
    ):
        fetch_dataset("s3://datasets/big", tmp_path, s3_endpoint_url=s3_endpoint, max_bytes=2500)
    fetched = fetch_dataset("s3://datasets/big", tmp_path / "ok", s3_endpoint_url=s3_endpoint, max_bytes=4000)
    assert (fetched.downloaded_files, fetched.downloaded_bytes) == (4, 4000)


class InFlight:
    """Counts GetObject requests on the wire at once; each takes 50 ms, like a real S3 round trip."""

    def __init__(self):
        self.lock, self.now, self.most, self.heads = threading.Lock(), 0, 0, 0

    def get(self, **_):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.05)
        with self.lock:
            self.now -= 1

    def head(self, **_):
        self.heads += 1


@pytest.mark.parametrize("concurrency, at_least, at_most", [(8, 4, 8), (1, 1, 1)])
def test_s3_folder_downloads_concurrently(tmp_path, s3, s3_endpoint, concurrency, at_least, at_most):
    for i in range(24):
        s3.put_object(Bucket="datasets", Key=f"conc/f{i:02d}.png", Body=bytes([i]) * 100)
    boto3.setup_default_session()  # fetch's client comes from the default session: watch its requests
    probe = InFlight()
    boto3.DEFAULT_SESSION.events.register("before-send.s3.GetObject", probe.get)
    boto3.DEFAULT_SESSION.events.register("before-send.s3.HeadObject", probe.head)
    try:
        fetched = fetch_dataset("s3://datasets/conc", tmp_path, s3_endpoint_url=s3_endpoint, s3_concurrency=concurrency)
    finally:
        boto3.DEFAULT_SESSION = None
    assert fetched.downloaded_files == 24
    assert sorted((fetched.root / f"f{i:02d}.png").read_bytes() for i in range(24)) == sorted(
        bytes([i]) * 100 for i in range(24)
    )
    assert at_least <= probe.most <= at_most
    assert probe.heads == 0, "sizes come from the listing: no HEAD request per object"
