"""Checks of a batch's own resources in the driver, before Ray starts or a tracking run is opened: the base model
folder and its weight files, the scorer folders, the storage (an S3 endpoint reachable, credentials accepted, the
bucket there and writable), the MLflow server when one is named. Each failure is one line naming what, where and
the fix; nothing is created (no mirror folder, no tracking run; the test object written to the bucket is removed).
(Concept images are checked per concept later: a bad concept fails only itself.)"""

from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path

from personalize import storage
from personalize.errors import ConfigError
from personalize.models import SUBFOLDERS

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be loaded, read from its header alone (no tensor is read), or None."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    if size < 8:
        return f"is cut off ({size} bytes, no header)"
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            return f"is cut off or not safetensors (header of {header_len} bytes in a {size}-byte file)"
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "has an unreadable safetensors header (not safetensors, or damaged)"
    ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    if ends and max(ends) > size - 8 - header_len:
        return f"is cut off: its header promises {max(ends)} bytes of tensors, the file holds {size - 8 - header_len}"
    return None


def model_problems(model: str) -> list[str]:
    """A local diffusers folder: present, a folder, every component there, each weight file readable."""
    local = "://" not in model and (model.startswith(("/", ".", "~")) or Path(model).exists())
    if not local:
        return []  # s3 uris and hub ids are reached where they load
    path = Path(model).expanduser()
    fix = "point model= at a complete diffusers pipeline folder (see `personalize tiny-model`)"
    if not path.exists():
        return [f"model {path}: no such folder; {fix}"]
    if not path.is_dir():
        return [f"model {path}: a file, not a folder; {fix}"]
    problems = [f"model {path}: no {name}/ subfolder; {fix}" for name in SUBFOLDERS if not (path / name).is_dir()]
    for name in ("text_encoder", "vae", "unet", "text_encoder_2"):  # the last: SDXL's, checked where present
        folder = path / name
        if not folder.is_dir():
            continue
        weights = [f for f in sorted(folder.iterdir()) if f.suffix in WEIGHT_SUFFIXES]
        if not weights:
            problems.append(f"model {folder}: no weight file (*.safetensors); {fix}")
        for file in weights:
            problem = _safetensors_problem(file) if file.suffix == ".safetensors" else (
                "is empty (0 bytes)" if file.stat().st_size == 0 else None)
            if problem:
                problems.append(f"model {file} {problem}; copy the model folder again, or {fix}")
    return problems


def scorer_problems(evaluation, section: str = "evaluation") -> list[str]:
    """Scorer folders named by path must exist (names without a path are model ids, loaded where they run)."""
    if evaluation is None:
        return []
    problems = []
    for key in ("clip", "dino"):
        value = getattr(evaluation, key)
        if value.startswith(("/", ".", "~")) and not Path(value).expanduser().is_dir():
            problems.append(f"{section}.{key} {value}: no such folder; point it at the scorer's folder, or set "
                            f"{section}: null to skip {section}")
    return problems


def storage_problems(root: str) -> list[str]:
    """A local folder that can be made; or an S3 prefix whose endpoint answers, whose credentials are accepted and
    whose bucket exists and takes (and gives back) a test object."""
    if not storage.is_s3(root):
        path = Path(root).expanduser()
        if path.exists() and not path.is_dir():
            return [f"storage {root}: a file, not a folder; name a folder (or s3://bucket/prefix)"]
        existing = next(p for p in [path, *path.parents] if p.exists())
        if not os.access(existing, os.W_OK):
            return [f"storage {root}: {existing} is not writable; name a folder you can write (or s3://bucket/prefix)"]
        return []
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    bucket, prefix = storage.split(root)
    endpoint = storage.endpoint_url() or "AWS S3"
    session = boto3.session.Session()
    if session.get_credentials() is None:
        return [f"storage {root}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); "
                "with the local stack: source .stack/env.sh"]
    s3 = session.client("s3", endpoint_url=storage.endpoint_url(), region_name=os.environ.get("AWS_REGION", "us-east-1"),
                        config=Config(retries={"max_attempts": 1}, connect_timeout=3, read_timeout=10, s3={"addressing_style": "path"}))
    probe = f"{prefix}/.preflight-{uuid.uuid4().hex}".lstrip("/")
    try:
        s3.head_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key=probe, Body=b"personalize preflight\n")
        s3.delete_object(Bucket=bucket, Key=probe)
    except EndpointConnectionError:
        return [f"storage {root}: cannot reach the S3 endpoint {endpoint}; start it (`personalize stack up`) or set "
                "AWS_ENDPOINT_URL_S3 to a server that answers"]
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            return [f"storage {root}: bucket {bucket!r} does not exist at {endpoint}; create it (aws s3 mb s3://{bucket}) "
                    "or name another"]
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            return [f"storage {root}: {endpoint} refused the credentials ({code}); check AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, and that they may read and write the bucket"]
        return [f"storage {root}: {endpoint} answered {code or e}; check the bucket and the credentials"]
    except BotoCoreError as e:
        return [f"storage {root}: {type(e).__name__} talking to {endpoint}; check AWS_ENDPOINT_URL_S3 and the network"]
    return []


def tracking_problems(tracking) -> list[str]:
    """A named MLflow server must answer its health check (a local ./mlruns store needs nothing)."""
    uri = (tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")) if tracking.enabled else ""
    if not uri.startswith(("http://", "https://")):
        return []
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as answer:
            if answer.status == 200:
                return []
    except (urllib.error.URLError, OSError):
        pass
    return [f"tracking: the MLflow server at {uri} does not answer; start it (`personalize stack up`), point "
            "MLFLOW_TRACKING_URI at one that does, or set tracking.enabled=false"]


def check_batch_resources(config, source: str) -> None:
    """Every problem of the batch's own resources at once, as a ConfigError (exit 2, nothing started)."""
    problems = model_problems(config.model) + scorer_problems(config.evaluation) \
        + scorer_problems(config.validation, "validation") + storage_problems(config.storage) + tracking_problems(config.tracking)
    if problems:
        raise ConfigError(source, problems)
