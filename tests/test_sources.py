import io
import zipfile
from pathlib import Path

import boto3
import pytest

from chest_ct.sources import DataSourceError, drive_file_id, fetch
from tests.conftest import write_dataset

FILE_ID = "1z0mreUtRmR-P-magILsDR3T7M6IkGXtY"


@pytest.mark.parametrize("uri", [
    f"gdrive://{FILE_ID}",
    f"https://drive.google.com/file/d/{FILE_ID}/view?usp=sharing",
    f"https://drive.google.com/uc?id={FILE_ID}&export=download",
    f"https://drive.google.com/open?id={FILE_ID}",
])
def test_drive_file_id_forms(uri):
    assert drive_file_id(uri) == FILE_ID


def test_drive_uri_without_id():
    with pytest.raises(DataSourceError, match="cannot find a Google Drive file id"):
        drive_file_id("https://drive.google.com/drive/my-drive")


@pytest.mark.parametrize("uri, message", [
    ("ftp://host/data.zip", "unsupported scheme 'ftp'"),
    ("gs://bucket/data.zip", "unsupported scheme 'gs'"),
    ("", "data_uri is empty"),
    ("/no/such/dataset", "does not exist"),
])
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
        p.relative_to(small_dataset).as_posix() for p in small_dataset.rglob("*.png"))


def test_s3_missing_object_and_empty_prefix(tmp_path, s3, s3_endpoint):
    with pytest.raises(DataSourceError, match="s3://datasets/nope.zip.*S3 download failed"):
        fetch("s3://datasets/nope.zip", tmp_path / "a", s3_endpoint_url=s3_endpoint)
    with pytest.raises(DataSourceError, match="no objects under s3://datasets/empty/"):
        fetch("s3://datasets/empty", tmp_path / "b", s3_endpoint_url=s3_endpoint)
    with pytest.raises(DataSourceError, match="S3 download failed"):
        fetch("s3://no-such-bucket/x.zip", tmp_path / "c", s3_endpoint_url=s3_endpoint)
