"""Object storage (S3 and compatible servers such as SeaweedFS or MinIO) through boto3.

The endpoint comes from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (or an explicit argument); credentials from the
environment or an instance role, never from configs. Uploads are multipart and retried; a folder is marked
finished by a marker object uploaded last, so a half-written folder never looks complete.
"""

from __future__ import annotations

import hashlib
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


def list_keys(uri: str, s3=None) -> list[tuple[str, int]]:
    """(key relative to the prefix, size) of every object below a prefix."""
    s3 = s3 or client()
    bucket, prefix = split(uri)
    prefix = prefix + "/" if prefix else ""
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [(o["Key"][len(prefix):], o["Size"]) for o in page.get("Contents", [])]
    return out


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


def write_bytes(uri: str, data: bytes, s3=None) -> None:
    s3 = s3 or client()
    bucket, key = split(uri)
    s3.put_object(Bucket=bucket, Key=key, Body=data)


def download_prefix(uri: str, target: str | Path, marker: str | None = None, s3=None) -> Path:
    """Copy every object below `uri` into `target` (skipping files already there with the same size).
    With `marker`, the prefix must hold that object: an unfinished folder is an error, not a silent half copy."""
    s3 = s3 or client()
    target = Path(target)
    keys = list_keys(uri, s3)
    if not keys:
        raise FileNotFoundError(f"nothing stored under {uri}")
    if marker and marker not in {k for k, _ in keys}:
        raise FileNotFoundError(f"{uri} is not finished (no {marker})")
    bucket, prefix = split(uri)
    for key, size in keys:
        local = target / key
        if local.is_file() and local.stat().st_size == size:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part")
        s3.download_file(bucket, f"{prefix}/{key}" if prefix else key, str(tmp), Config=transfer_config())
        tmp.rename(local)
    return target


def upload_dir(source: str | Path, uri: str, marker: str | None = None, s3=None) -> int:
    """Upload a folder below `uri`; the `marker` file (if any) goes last, once everything else is there."""
    s3 = s3 or client()
    source = Path(source)
    bucket, prefix = split(uri)
    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
    files.sort(key=lambda p: p.name == marker)  # the marker last
    for path in files:
        key = "/".join(filter(None, [prefix, path.relative_to(source).as_posix()]))
        s3.upload_file(str(path), bucket, key, Config=transfer_config())
    return len(files)


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
