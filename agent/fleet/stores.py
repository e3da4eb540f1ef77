"""Where the dataset lives: a local directory or an S3-compatible bucket.

Both stores answer the same two questions, so the spool publishes to either the same way:
`has(object)` (already there with this size and content?) and `put(object, file)`.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

from core.errors import BadInput, WorkFailed
from agent.fleet.layout import StagedObject, file_md5


class StoreUnavailable(WorkFailed):
    """The store cannot be reached now; objects stay in the spool and go up later."""


def ensure_writable_dir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInput(f"{what}: cannot create it ({error.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadInput(f"{what}: not writable")


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.put_count = 0

    def describe(self) -> str:
        return str(self.root)

    def check(self) -> None:
        ensure_writable_dir(self.root, f"dataset root {self.root}")

    def has(self, obj: StagedObject) -> bool:
        path = self.root / obj.key
        try:
            if path.stat().st_size != obj.size_bytes:
                return False
        except FileNotFoundError:
            return False
        return file_md5(path) == obj.md5_hex

    def put(self, obj: StagedObject, source: Path) -> None:
        path = self.root / obj.key
        path.parent.mkdir(parents=True, exist_ok=True)
        from core.atomic import atomic_path

        with atomic_path(path) as temp:
            shutil.copyfile(source, temp)
        self.put_count += 1


def split_s3_url(url: str) -> tuple[str, str]:
    rest = url.split("://", 1)[1]
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


class S3Store:
    """boto3 with short timeouts and a few retries: when the store is down we want to give up
    quickly (the spool keeps the bundle) rather than block the daemon's next window."""

    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None,
                 connect_timeout_s: float = 3.0, read_timeout_s: float = 30.0, max_attempts: int = 3):
        # Optional (the `s3` extra) and slow (0.5 s here): only an s3:// dataset imports it.
        import boto3
        from botocore.config import Config

        self.url = url
        self.bucket, self.prefix = split_s3_url(url)
        self.endpoint_url = endpoint_url
        self.region = region
        config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        self.put_count = 0

    def describe(self) -> str:
        return self.url

    def check(self) -> None:
        return None  # reachability is checked by publishing; an outage is not bad input

    def object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, operation: str, **kwargs):
        from botocore.exceptions import (BotoCoreError, ClientError, EndpointConnectionError,
                                         NoCredentialsError)

        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except NoCredentialsError:
            raise StoreUnavailable(f"{self.url}: no S3 credentials (set AWS_ACCESS_KEY_ID/"
                                   "AWS_SECRET_ACCESS_KEY, e.g. in /etc/guardian-agent/environment)") from None
        except EndpointConnectionError as error:
            raise StoreUnavailable(f"{self.url}: store unreachable ({error})") from None
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if operation == "head_object" and code in ("404", "NoSuchKey", "NotFound"):
                return None
            if code in ("NoSuchBucket",):
                raise StoreUnavailable(f"{self.url}: bucket {self.bucket!r} does not exist") from None
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            raise StoreUnavailable(f"{self.url}: {operation} failed ({code or status})") from None
        except BotoCoreError as error:
            raise StoreUnavailable(f"{self.url}: {type(error).__name__}: {error}") from None

    def delete_keys(self, keys: list[str], batch: int = 1000) -> list[dict]:
        """Delete objects (keys relative to ROOT), `batch` per DeleteObjects request (1,000 is the
        most one takes); returns the per-key errors other than NoSuchKey (already gone is fine)."""
        failed = []
        for start in range(0, len(keys), batch):
            answer = self._call("delete_objects", Delete={
                "Objects": [{"Key": self.object_key(key)} for key in keys[start:start + batch]], "Quiet": True})
            failed += [error for error in answer.get("Errors", []) if error.get("Code") != "NoSuchKey"]
        return failed

    def has(self, obj: StagedObject) -> bool:
        head = self._call("head_object", Key=self.object_key(obj.key))
        if head is None:
            return False
        # Our own md5 metadata, not the ETag: S3-compatible stores disagree on what an ETag is.
        return (head.get("ContentLength") == obj.size_bytes
                and head.get("Metadata", {}).get("md5") == obj.md5_hex)

    def put(self, obj: StagedObject, source: Path) -> None:
        content_md5 = base64.b64encode(bytes.fromhex(obj.md5_hex)).decode()
        with open(source, "rb") as body:
            # Content-MD5 makes the store reject a body corrupted in transit.
            self._call("put_object", Key=self.object_key(obj.key), Body=body, ContentMD5=content_md5,
                       ContentLength=obj.size_bytes, Metadata={"md5": obj.md5_hex})
        self.put_count += 1


def open_store(root: str, endpoint_url: str | None = None, region: str | None = None):
    if "://" in root:
        if not root.startswith("s3://"):
            raise BadInput(f"dataset root {root}: only local paths and s3:// URLs are supported")
        return S3Store(root, endpoint_url=endpoint_url, region=region)
    return LocalStore(Path(root))
