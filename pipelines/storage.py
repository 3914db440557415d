"""The batch's storage root: a local folder, or s3://bucket/prefix mirrored to a local folder.

Training writes run folders locally (torch saves files); with an s3 root, finished folders are uploaded with
their done marker last, finished work is found there on resubmission, and Ray Train keeps its stage
checkpoints on s3 directly (pyarrow's S3 filesystem with an explicit endpoint).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from personalize import storage


class StorageRoot:
    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.remote = storage.is_s3(root)
        self.local_root = storage.local_mirror(self.root) if self.remote else Path(root).expanduser().resolve()

    def local(self, *parts: str) -> Path:
        return self.local_root.joinpath(*parts)

    def uri(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) if self.remote else str(self.local(*parts))

    def relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.local_root.resolve()).as_posix()

    def pull(self, rel: str, marker: str | None = None) -> bool:
        """Bring a finished remote folder down (True if there was one); a local root has nothing to pull."""
        if not self.remote:
            return False
        if marker and not storage.exists(f"{self.uri(rel)}/{marker}"):
            return False
        try:
            storage.download_prefix(self.uri(rel), self.local(rel), marker)
            return True
        except FileNotFoundError:
            return False

    def push(self, rel: str, marker: str | None = None) -> None:
        if self.remote and self.local(rel).exists():
            storage.upload_dir(self.local(rel), self.uri(rel), marker, sync=True)

    def push_file(self, rel: str) -> None:
        if self.remote and self.local(rel).is_file():
            storage.write_bytes(self.uri(rel), self.local(rel).read_bytes())

    def pull_file(self, rel: str) -> bool:
        """Bring one remote file down if it is stored (True if it was)."""
        if not self.remote or not storage.exists(self.uri(rel)):
            return False
        self.local(rel).parent.mkdir(parents=True, exist_ok=True)
        self.local(rel).write_bytes(storage.read_bytes(self.uri(rel)))
        return True

    def remove_file(self, rel: str) -> None:
        """Delete a file here and, with an s3 root, in the bucket."""
        self.local(rel).unlink(missing_ok=True)
        if self.remote and storage.exists(self.uri(rel)):
            storage.delete(self.uri(rel))

    def remove_tree(self, rel: str) -> None:
        """Delete a folder here and, with an s3 root, everything stored below it in the bucket."""
        shutil.rmtree(self.local(rel), ignore_errors=True)
        if self.remote:
            storage.delete_prefix(self.uri(rel))

    def ray_storage(self, sub: str = "ray") -> tuple[str, object | None]:
        """(storage_path, storage_filesystem) for Ray Train's or Ray Tune's RunConfig."""
        if not self.remote:
            return str(self.local(sub)), None
        return f"{self.root.removeprefix(storage.S3)}/{sub}", s3_filesystem()


def s3_filesystem():
    """pyarrow's S3 filesystem with the endpoint passed explicitly (a bare S3FileSystem() ignores the
    AWS_ENDPOINT_URL variables); credentials come from the environment or the instance role."""
    import pyarrow.fs

    endpoint = storage.endpoint_url()
    kwargs = {"region": "us-east-1"}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host, scheme=scheme)
    return pyarrow.fs.S3FileSystem(**kwargs)
