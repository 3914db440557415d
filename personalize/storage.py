"""Object storage (S3 and compatible servers such as SeaweedFS or MinIO) through boto3.

The endpoint comes from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (or an explicit argument); credentials from the
environment or an instance role, never from configs. Uploads are multipart and retried; a folder is marked
finished by a marker object uploaded last, so a half-written folder never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

S3 = "s3://"


def is_s3(path: str | Path) -> bool:
    return str(path).startswith(S3)


def split(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix")"""
    bucket, _, key = uri.removeprefix(S3).partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket (expected s3://bucket/prefix)")
    return bucket, key.strip("/")


def endpoint_url(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def client(endpoint: str | None = None):
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 8, "mode": "adaptive"}, connect_timeout=10, read_timeout=120,
                    s3={"addressing_style": "path"})
    # a new session each time: boto3's default session keeps the first credentials it resolved for the life of
    # the process, so a process whose environment changes (a long-lived driver, a test session) would sign
    # requests with stale keys
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url(endpoint), config=config,
                        region_name=os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1")))


def transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=16 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024, max_concurrency=4)


def list_objects(uri: str, s3=None) -> list[tuple[str, int, str]]:
    """(key relative to the prefix, size, ETag) of every object below a prefix."""
    s3 = s3 or client()
    bucket, prefix = split(uri)
    prefix = prefix + "/" if prefix else ""
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [(o["Key"][len(prefix):], o["Size"], o.get("ETag", "").strip('"')) for o in page.get("Contents", [])]
    return out


def list_keys(uri: str, s3=None) -> list[tuple[str, int]]:
    """(key relative to the prefix, size) of every object below a prefix."""
    return [(key, size) for key, size, _ in list_objects(uri, s3)]


def exists(uri: str, s3=None) -> bool:
    from botocore.exceptions import ClientError

    s3 = s3 or client()
    bucket, key = split(uri)
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def read_bytes(uri: str, s3=None) -> bytes:
    s3 = s3 or client()
    bucket, key = split(uri)
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def delete(uri: str, s3=None) -> None:
    s3 = s3 or client()
    bucket, key = split(uri)
    s3.delete_object(Bucket=bucket, Key=key)


def delete_prefix(uri: str, s3=None) -> int:
    """Delete every object below a prefix; returns how many there were."""
    s3 = s3 or client()
    bucket, prefix = split(uri)
    keys = [f"{prefix}/{key}" if prefix else key for key, _, _ in list_objects(uri, s3)]
    for start in range(0, len(keys), 1000):  # the S3 API's limit per request
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True})
    return len(keys)


def write_bytes(uri: str, data: bytes, s3=None) -> None:
    s3 = s3 or client()
    bucket, key = split(uri)
    s3.put_object(Bucket=bucket, Key=key, Body=data)


SYNC_RECORD = ".s3-sync.json"  # in a synced folder: for each file, the object (ETag) and local state it matches


def _load_record(folder: Path) -> dict[str, dict]:
    path = folder / SYNC_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_record(folder: Path, record: dict[str, dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SYNC_RECORD).write_text(json.dumps(record, indent=0, sort_keys=True))


def _entry(path: Path, etag: str) -> dict:
    stat = path.stat()
    return {"etag": etag, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _in_sync(record: dict[str, dict], key: str, path: Path, etag: str | None) -> bool:
    """The local file is the very object `etag` names: recorded as such and not modified since."""
    entry = record.get(key)
    return bool(entry and etag and entry["etag"] == etag and path.is_file() and _entry(path, etag) == entry)


def download_prefix(uri: str, target: str | Path, marker: str | None = None, s3=None) -> Path:
    """Copy every object below `uri` into `target`.

    A file is skipped only when it is known to be that very object (same ETag, untouched since it was downloaded
    or uploaded): a local copy left over from another bucket's life, even one of the same size, is replaced, and
    a file downloaded earlier whose object is gone is removed. With `marker`, the prefix must hold that object:
    an unfinished folder is an error, not a silent half copy."""
    s3 = s3 or client()
    target = Path(target)
    objects = list_objects(uri, s3)
    if not objects:
        raise FileNotFoundError(f"nothing stored under {uri}")
    if marker and marker not in {k for k, _, _ in objects}:
        raise FileNotFoundError(f"{uri} is not finished (no {marker})")
    bucket, prefix = split(uri)
    record = _load_record(target)
    listed = {k for k, _, _ in objects}
    for key in [k for k in record if k not in listed]:
        (target / key).unlink(missing_ok=True)
        del record[key]
    try:
        for key, _, etag in objects:
            local = target / key
            if _in_sync(record, key, local, etag):
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.part")
            s3.download_file(bucket, f"{prefix}/{key}" if prefix else key, str(tmp), Config=transfer_config())
            tmp.rename(local)
            record[key] = _entry(local, etag)
    finally:
        _save_record(target, record)
    return target


def upload_dir(source: str | Path, uri: str, marker: str | None = None, s3=None, sync: bool = False) -> int:
    """Upload a folder below `uri`; the `marker` file (if any) goes last, once everything else is there.
    With `sync`, files already stored unchanged are skipped and the folder records what it now matches (so a
    later `download_prefix` into it fetches nothing it already has). Returns the number of files uploaded."""
    s3 = s3 or client()
    source = Path(source)
    bucket, prefix = split(uri)
    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
    files.sort(key=lambda p: p.name == marker)  # the marker last
    record = _load_record(source) if sync else {}
    stored = {k: etag for k, _, etag in list_objects(uri, s3)} if sync else {}
    uploaded = []
    for path in files:
        rel = path.relative_to(source).as_posix()
        if sync and _in_sync(record, rel, path, stored.get(rel)):
            continue
        before = path.stat()  # recorded as uploaded: a change during the upload shows as a later mtime
        s3.upload_file(str(path), bucket, "/".join(filter(None, [prefix, rel])), Config=transfer_config())
        uploaded.append((rel, before))
    if sync:
        stored = {k: (size, etag) for k, size, etag in list_objects(uri, s3)}
        for rel, before in uploaded:
            size, etag = stored.get(rel, (None, ""))
            if size == before.st_size and etag:
                record[rel] = {"etag": etag, "size": before.st_size, "mtime_ns": before.st_mtime_ns}
        _save_record(source, record)
    return len(uploaded)


def ensure_bucket(name: str, s3=None) -> None:
    from botocore.exceptions import ClientError

    s3 = s3 or client()
    try:
        s3.head_bucket(Bucket=name)
    except ClientError:
        s3.create_bucket(Bucket=name)


def local_mirror(uri: str) -> Path:
    """Where an s3 prefix is mirrored on this machine (inputs downloaded, outputs staged before upload)."""
    root = Path(os.environ.get("PERSONALIZE_CACHE", Path.home() / ".cache" / "personalize")) / "s3"
    bucket, prefix = split(uri)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:8]
    return root / bucket / (prefix.replace("/", "__") or "_root") / digest


def localize(path: str, marker: str | None = None) -> Path:
    """A local folder for a local path or an s3 uri (downloaded once into the mirror)."""
    if not is_s3(path):
        return Path(path)
    return download_prefix(path, local_mirror(path), marker)
