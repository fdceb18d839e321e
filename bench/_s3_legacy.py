"""Reference only: the hand-written S3 transfers ckptd used before s3transfer (issue 11, item 7).

``put_file`` / ``get_file`` are those of ``ckptd/store/s3.py`` at d9980fa, the
last commit before 0ab27b0 brought in s3transfer: each part ``pread`` into
``bytes`` and sent by ``upload_part`` from a thread pool of ``concurrency``
threads; each ranged GET's bytes ``pwrite`` into the file. Everything else
(client, checksums, commit) is today's S3Store. Kept so the benchmark can
set today's path beside the old one on the same server in the same run; it
is not shipped in ``ckptd/``, and it keeps the old path's flaw (``get_file``
closes the descriptor while queued parts may still write to it after an
error), so never use it for real data.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

from botocore.exceptions import BotoCoreError, ClientError

from ckptd.store.base import Progress
from ckptd.store.s3 import S3Config, S3Store

log = logging.getLogger("ckptd")

_MiB = 1 << 20
_MAX_PARTS = 9000


class LegacyS3Store(S3Store):
    """S3Store with the pre-s3transfer multipart upload and ranged parallel download."""

    def __init__(self, bucket: str, prefix: str = "", *, config: S3Config | None = None) -> None:
        super().__init__(bucket, prefix, config=config)
        self._parts = ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="legacy-s3")

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
        upload = self._call(
            what,
            self._client.create_multipart_upload,
            Bucket=self.bucket,
            Key=full,
            ChecksumAlgorithm=self.config.checksum,
        )["UploadId"]
        part = max(self.config.part_size, -(-size // (_MAX_PARTS * _MiB)) * _MiB)
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                futures = [
                    self._parts.submit(
                        self._upload_part, what, full, upload, fd, n + 1, off, min(part, size - off), progress
                    )
                    for n, off in enumerate(range(0, size, part))
                ]
                parts = [f.result() for f in futures]
            finally:
                os.close(fd)
            self._call(
                what,
                self._client.complete_multipart_upload,
                Bucket=self.bucket,
                Key=full,
                UploadId=upload,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload)
            except (ClientError, BotoCoreError, OSError):
                log.warning("could not abort the multipart upload of %s", what)
            raise

    def _upload_part(
        self,
        what: str,
        full: str,
        upload: str,
        fd: int,
        number: int,
        offset: int,
        length: int,
        progress: Progress | None,
    ) -> dict:
        data = os.pread(fd, length, offset)
        resp = self._call(
            f"{what} (part {number})",
            self._client.upload_part,
            Bucket=self.bucket,
            Key=full,
            UploadId=upload,
            PartNumber=number,
            Body=data,
            ChecksumAlgorithm=self.config.checksum,
        )
        if progress is not None:
            progress(length)
        entry = {"PartNumber": number, "ETag": resp["ETag"]}
        field = f"Checksum{self.config.checksum}"
        if field in resp:
            entry[field] = resp[field]
        return entry

    def get_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        head = self._call(f"head {self.uri}/{key}", self._client.head_object, Bucket=self.bucket, Key=self._key(key))
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

    def close(self) -> None:
        super().close()
        self._parts.shutdown(wait=True)
