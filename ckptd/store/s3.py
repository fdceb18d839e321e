"""An S3 store through boto3: parallel multipart uploads, ranged reads, conditional commit.

Endpoint, region and credentials come from the standard AWS chain
(``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``...), so MinIO,
SeaweedFS or Ceph need nothing ckptd-specific. Uploads carry CRC32C
checksums that the server verifies. Error messages name the bucket, key and
endpoint, never a credential.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from ..errors import ConfigError, SnapshotExists, StoreError, StoreUnreachable
from . import redact
from .base import ObjectInfo, Progress
from .keys import check_key

log = logging.getLogger("ckptd")

_MiB = 1 << 20
_MAX_PARTS = 9000  # S3 allows 10,000; leave room


@dataclass(frozen=True, kw_only=True)
class S3Config:
    """Transfer settings of an S3Store."""

    part_size: int = 8 * _MiB
    """Bytes per multipart part and per ranged GET (grown for huge files: S3 allows 10,000 parts);
    files up to this go in one request. 8 MiB measured fastest against SeaweedFS here (123 MiB/s
    against 76 MiB/s with 64 MiB parts)."""
    concurrency: int = 8
    """Parts in flight at once, per store."""
    checksum: str = "CRC32C"
    """Checksum the server verifies on every upload: CRC32C or SHA256."""
    max_attempts: int = 4
    """botocore's retries per request (standard mode) before an error reaches ckptd."""
    connect_timeout: float = 5.0
    """Seconds to open a connection."""
    read_timeout: float = 60.0
    """Seconds without data before a request fails."""

    def __post_init__(self) -> None:
        if self.part_size < 5 * _MiB:
            raise ConfigError(f"S3Config.part_size={self.part_size}: S3 parts are at least 5 MiB")
        if not 1 <= self.concurrency <= 64:
            raise ConfigError(f"S3Config.concurrency={self.concurrency}: use 1 to 64")
        if self.checksum not in ("CRC32C", "SHA256"):
            raise ConfigError(f"S3Config.checksum={self.checksum!r}: use 'CRC32C' or 'SHA256'")
        if self.max_attempts < 1:
            raise ConfigError("S3Config.max_attempts must be >= 1")


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _is_loopback_or_ip(endpoint: str | None) -> bool:
    host = urlparse(endpoint).hostname if endpoint else None
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class S3Store:
    """Objects under ``s3://bucket/prefix``. Thread-safe; owns one part executor (``close()``)."""

    def __init__(self, bucket: str, prefix: str = "", *, config: S3Config | None = None, create: bool = True) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.config = config or S3Config()
        redact.install()
        self.endpoint = _endpoint() or "AWS default endpoint"
        addressing = "path" if _is_loopback_or_ip(_endpoint()) else "auto"
        self._client = boto3.session.Session().client("s3", config=Config(
            s3={"addressing_style": addressing},
            retries={"max_attempts": self.config.max_attempts, "mode": "standard"},
            max_pool_connections=self.config.concurrency * 2 + 4,
            connect_timeout=self.config.connect_timeout,
            read_timeout=self.config.read_timeout,
        ))
        self._parts = ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="ckptd-s3")
        self._closed = threading.Event()
        self._check_bucket()

    @classmethod
    def from_uri(cls, uri: str, *, create: bool = True, config: S3Config | None = None) -> "S3Store":
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ConfigError(f"store {uri!r}: expected s3://bucket/prefix")
        return cls(parsed.netloc, parsed.path, config=config, create=create)

    # -- errors ---------------------------------------------------------------

    def _check_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError as e:
            raise StoreUnreachable(
                f"no AWS credentials for s3://{self.bucket}: set AWS_PROFILE or AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY") from e
        except ClientError as e:
            code = _code(e)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StoreUnreachable(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint}; create it or fix the name") from e
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StoreUnreachable(
                    f"access to bucket {self.bucket!r} at {self.endpoint} denied ({code}); check the "
                    "credentials (AWS_PROFILE / AWS_ACCESS_KEY_ID) and the bucket policy") from e
            raise StoreUnreachable(f"bucket {self.bucket!r} at {self.endpoint}: {code}") from e
        except BotoCoreError as e:
            raise StoreUnreachable(
                f"cannot reach the S3 endpoint {self.endpoint} for bucket {self.bucket!r}: "
                f"{type(e).__name__}; check AWS_ENDPOINT_URL and the network") from e

    def _call(self, what: str, fn: Callable[..., Any], **kw: Any) -> Any:
        """One boto3 call, its errors wrapped as StoreError naming ``what``."""
        try:
            return fn(**kw)
        except ClientError as e:
            raise StoreError(f"{what} at {self.endpoint}: {_code(e)}: {_message(e)}") from e
        except (BotoCoreError, OSError) as e:
            raise StoreError(f"{what} at {self.endpoint}: {type(e).__name__}") from e

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    # -- writes ---------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(f"put {self.uri}/{key}", self._client.put_object, Bucket=self.bucket, Key=self._key(key),
                   Body=data, ChecksumAlgorithm=self.config.checksum)

    def put_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        size = os.path.getsize(path)
        if size <= self.config.part_size:
            with open(path, "rb") as f:
                self.put_bytes(key, f.read())
            if progress is not None:
                progress(size)
            return
        self._multipart(key, path, size, progress)

    def _multipart(self, key: str, path: str, size: int, progress: Progress | None) -> None:
        what = f"upload {self.uri}/{key}"
        full = self._key(key)
        upload = self._call(what, self._client.create_multipart_upload, Bucket=self.bucket, Key=full,
                            ChecksumAlgorithm=self.config.checksum)["UploadId"]
        part = max(self.config.part_size, -(-size // (_MAX_PARTS * _MiB)) * _MiB)
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                futures = [self._parts.submit(self._upload_part, what, full, upload, fd, n + 1, off,
                                              min(part, size - off), progress)
                           for n, off in enumerate(range(0, size, part))]
                parts = [f.result() for f in futures]
            finally:
                os.close(fd)
            self._call(what, self._client.complete_multipart_upload, Bucket=self.bucket, Key=full,
                       UploadId=upload, MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload)
            except (ClientError, BotoCoreError, OSError):
                log.warning("ckptd: could not abort the multipart upload of %s; gc removes it later", what)
            raise

    def _upload_part(self, what: str, full: str, upload: str, fd: int, number: int, offset: int, length: int,
                     progress: Progress | None) -> dict:
        data = os.pread(fd, length, offset)
        resp = self._call(f"{what} (part {number})", self._client.upload_part, Bucket=self.bucket, Key=full,
                          UploadId=upload, PartNumber=number, Body=data, ChecksumAlgorithm=self.config.checksum)
        if progress is not None:
            progress(length)
        entry = {"PartNumber": number, "ETag": resp["ETag"]}
        field = f"Checksum{self.config.checksum}"
        if field in resp:
            entry[field] = resp[field]
        return entry

    def commit(self, key: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*",
                                    ChecksumAlgorithm=self.config.checksum)
        except ClientError as e:
            if _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise SnapshotExists(
                    f"{self.uri}/{key} is already committed by another writer; a step is committed once, "
                    "so this copy was discarded") from e
            raise StoreError(f"commit {self.uri}/{key} at {self.endpoint}: {_code(e)}: {_message(e)}") from e
        except (BotoCoreError, OSError) as e:
            raise StoreError(f"commit {self.uri}/{key} at {self.endpoint}: {type(e).__name__}") from e

    # -- reads ----------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        resp = self._call(f"get {self.uri}/{key}", self._client.get_object, Bucket=self.bucket, Key=self._key(key))
        return self._read_body(f"get {self.uri}/{key}", resp)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        what = f"get {self.uri}/{key} bytes {offset}+{length}"
        resp = self._call(what, self._client.get_object, Bucket=self.bucket, Key=self._key(key),
                          Range=f"bytes={offset}-{offset + length - 1}")
        return self._read_body(what, resp)

    def _read_body(self, what: str, resp: dict) -> bytes:
        try:
            return resp["Body"].read()
        except (BotoCoreError, OSError) as e:
            raise StoreError(f"{what} at {self.endpoint}: {type(e).__name__} while reading") from e

    def get_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        head = self._call(f"head {self.uri}/{key}", self._client.head_object, Bucket=self.bucket,
                          Key=self._key(key))
        size = head["ContentLength"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            part = self.config.part_size

            def fetch(offset: int) -> None:
                data = self.get_range(key, offset, min(part, size - offset))
                os.pwrite(fd, data, offset)
                if progress is not None:
                    progress(len(data))

            for fut in [self._parts.submit(fetch, off) for off in range(0, size, part)]:
                fut.result()
            os.fsync(fd)
        finally:
            os.close(fd)

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StoreError(f"head {self.uri}/{key} at {self.endpoint}: {_code(e)}") from e
        except (BotoCoreError, OSError) as e:
            raise StoreError(f"head {self.uri}/{key} at {self.endpoint}: {type(e).__name__}") from e

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full = self._key(prefix) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        out = []
        for page in self._pages(f"list {self.uri}/{prefix}", Prefix=full):
            for obj in page.get("Contents", []):
                out.append(ObjectInfo(self._rel(obj["Key"]), obj["Size"], obj["LastModified"].timestamp()))
        return sorted(out, key=lambda o: o.key)

    def children(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        names = set()
        for page in self._pages(f"list {self.uri}/{prefix}", Prefix=full, Delimiter="/"):
            for cp in page.get("CommonPrefixes", []):
                names.add(cp["Prefix"][len(full):].rstrip("/"))
        return sorted(n for n in names if n)

    def _pages(self, what: str, **kw: Any):
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            yield from paginator.paginate(Bucket=self.bucket, **kw)
        except ClientError as e:
            raise StoreError(f"{what} at {self.endpoint}: {_code(e)}: {_message(e)}") from e
        except (BotoCoreError, OSError) as e:
            raise StoreError(f"{what} at {self.endpoint}: {type(e).__name__}") from e

    # -- deletes ----------------------------------------------------------------

    def delete(self, keys: Sequence[str]) -> None:
        full = [self._key(k) for k in keys]
        for i in range(0, len(full), 1000):
            batch = [{"Key": k} for k in full[i:i + 1000]]
            resp = self._call(f"delete {len(batch)} objects in {self.uri}", self._client.delete_objects,
                              Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            errors = [e for e in resp.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                raise StoreError(f"delete in {self.uri}: {errors[0].get('Key')}: {errors[0].get('Code')}")

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under ``prefix`` (a snapshot directory)."""
        self.delete([o.key for o in self.list(prefix)])

    def abort_stale_uploads(self, older_than: float) -> int:
        """Abort multipart uploads under the prefix started more than ``older_than`` seconds ago."""
        now = datetime.now(timezone.utc)
        paginator = self._client.get_paginator("list_multipart_uploads")
        aborted = 0
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for up in page.get("Uploads", []):
                    if (now - up["Initiated"]).total_seconds() >= older_than:
                        self._client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"],
                                                            UploadId=up["UploadId"])
                        aborted += 1
        except ClientError as e:
            raise StoreError(f"list uploads in {self.uri} at {self.endpoint}: {_code(e)}") from e
        except (BotoCoreError, OSError) as e:
            raise StoreError(f"list uploads in {self.uri} at {self.endpoint}: {type(e).__name__}") from e
        return aborted

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._parts.shutdown(wait=True)

    def __enter__(self) -> "S3Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code") or e.response.get("ResponseMetadata", {}).get(
        "HTTPStatusCode", "error"))


def _message(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Message", "")).splitlines()[0][:200] if e.response else ""
