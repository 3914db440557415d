"""Storage and tracking are checked in the driver before anything starts, against a real SeaweedFS: one line
naming the storage and the fix, exit 2, and nothing left behind (no mirror folder, no test object)."""

import pytest

from personalize import storage
from pipelines.batch import main
from pipelines.preflight import storage_problems, tracking_problems
from pipelines.tracking import TrackingSpec


def test_a_reachable_writable_bucket_passes_and_keeps_no_test_object(seaweedfs):
    assert storage_problems("s3://personalize/preflight-ok") == []
    assert storage.list_keys("s3://personalize/preflight-ok") == []


def test_a_missing_bucket_is_named_with_the_fix(seaweedfs):
    assert storage_problems("s3://no-such-bucket/x") == [
        f"storage s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist at {storage.endpoint_url()}; create it "
        "(aws s3 mb s3://no-such-bucket) or name another"]


def test_rejected_credentials(seaweedfs, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    [problem] = storage_problems("s3://personalize/x")
    assert "refused the credentials" in problem and "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in problem
    assert "not-the-secret" not in problem


def test_no_endpoint_answering(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    assert storage_problems("s3://bucket/x") == [
        "storage s3://bucket/x: cannot reach the S3 endpoint http://127.0.0.1:9; start it (`personalize stack up`) or "
        "set AWS_ENDPOINT_URL_S3 to a server that answers"]


def test_no_credentials(monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert "no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in storage_problems("s3://bucket/x")[0]


def test_a_local_storage_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert storage_problems(str(tmp_path / "file")) == [f"storage {tmp_path / 'file'}: a file, not a folder; name a "
                                                        "folder (or s3://bucket/prefix)"]
    assert storage_problems(str(tmp_path / "new" / "folder")) == []


def test_an_mlflow_server_that_does_not_answer(monkeypatch):
    assert tracking_problems(TrackingSpec(uri="http://127.0.0.1:9")) == [
        "tracking: the MLflow server at http://127.0.0.1:9 does not answer; start it (`personalize stack up`), point "
        "MLFLOW_TRACKING_URI at one that does, or set tracking.enabled=false"]
    assert tracking_problems(TrackingSpec(uri="http://127.0.0.1:9", enabled=False)) == []
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_problems(TrackingSpec()) == []  # the local ./mlruns store


@pytest.mark.parametrize("storage_uri", ["s3://no-such-bucket/batch"])
def test_the_batch_refuses_bad_storage_before_starting_anything(seaweedfs, storage_uri, tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "batch.yaml"
    config.write_text(f"model: {tiny_model}\nmethods: [textual_inversion]\nconcepts: [{{id: c, images: {tmp_path}, "
                      f"super_category: toy}}]\nstorage: {storage_uri}\nevaluation: null\n")
    assert main([str(config)]) == 2
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "mlruns").exists()  # no mirror, no tracking run
