"""One upgrade per gallery at a time: a lease in the gallery's own storage (`GALLERY/_lock.json`).

The lease is taken with a create-if-absent write and renewed, taken over or released with
compare-and-swap on the object's ETag: S3's conditional writes (`If-None-Match: *`,
`If-Match`), or a `flock`-guarded file on a local disk. So two schedulers on two hosts cannot
both win, and a holder that dies frees the gallery once its lease expires (`ttl_seconds`).
Expiry compares wall clocks of different hosts: keep them in sync (NTP) and the TTL generous.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from pipeline.config import StorageConfig
from pipeline.gallery.store import GalleryError
from pipeline.io import uri as uri_io
from pipeline.io.uri import StorageError

LOCK_FILE = "_lock.json"
TOKEN_ENV = "CARRYOVER_LOCK_TOKEN"  # a job adopts the lease its submitter took
log = logging.getLogger(__name__)


class LockHeld(GalleryError):
    """Another holder has the gallery's lease; the message says who, since when, until when."""


class LockLost(GalleryError):
    """Our lease was taken over or removed while we held it (it expired, or was broken)."""


@dataclass
class LockInfo:
    """The lease as stored: who holds it, for what, and until when (epoch seconds)."""

    token: str
    owner: str
    purpose: str
    host: str
    pid: int
    acquired_at: float
    expires_at: float

    @property
    def expired(self) -> bool:
        return time.time() > self.expires_at

    def describe(self) -> str:
        def at(t: float) -> str:
            return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))

        left = self.expires_at - time.time()
        state = f"expires {at(self.expires_at)} (in {left:.0f}s)" if left > 0 else "expired"
        return (
            f"{self.owner} ({self.purpose}) on {self.host} pid {self.pid} since "
            f"{at(self.acquired_at)}, {state}"
        )


# -- storage back ends: get / create / replace / delete with ETags ------------------------
class _LocalObject:
    """A local file with compare-and-swap under an exclusive flock on a guard file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.guard = self.path.with_name(self.path.name + ".guard")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.guard, "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self) -> tuple[bytes, str] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def _write(self, data: bytes) -> str:
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
        return hashlib.sha256(data).hexdigest()

    def get(self) -> tuple[bytes, str] | None:
        # No guard: writes are whole-file renames, so a bare read is consistent, and a mere
        # look (`lock show`, a missing gallery) creates neither the folder nor the guard file.
        return self._read()

    def create(self, data: bytes) -> str | None:
        with self._locked():
            return None if self.path.exists() else self._write(data)

    def replace(self, data: bytes, etag: str) -> str | None:
        with self._locked():
            cur = self._read()
            return self._write(data) if cur is not None and cur[1] == etag else None

    def delete(self, etag: str | None) -> bool:
        with self._locked():
            cur = self._read()
            if cur is None or (etag is not None and cur[1] != etag):
                return False
            self.path.unlink()
            return True


class _S3Object:
    """An S3 object with conditional writes (AWS S3 and compatible endpoints since 2024)."""

    def __init__(self, uri: str, storage: StorageConfig | None) -> None:
        # start-up: botocore's session and config cost ~0.15 s; only s3:// galleries need them.
        import botocore.session
        from botocore.config import Config

        st = (storage or StorageConfig()).resolved()
        self.uri = uri
        self.bucket, _, self.key = uri[len("s3://") :].partition("/")
        creds = {}
        if st.access_key_id and st.secret_access_key:
            creds = {
                "aws_access_key_id": st.access_key_id.get_secret_value(),
                "aws_secret_access_key": st.secret_access_key.get_secret_value(),
            }
        self.client = botocore.session.get_session().create_client(
            "s3",
            region_name=st.region,
            endpoint_url=st.endpoint_url,
            config=Config(retries={"max_attempts": max(1, st.retries), "mode": "standard"}),
            **creds,
        )

    @staticmethod
    def _conflict(e: Exception) -> bool:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    def _failed(self, op: str, e: Exception) -> StorageError:
        # A vanished bucket or endpoint: the project's one-line error naming the lock object.
        return StorageError(f"{op} {self.uri}: {e}")

    def get(self) -> tuple[bytes, str] | None:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
            return r["Body"].read(), r["ETag"]
        except self.client.exceptions.NoSuchKey:
            return None
        except (ClientError, BotoCoreError) as e:
            raise self._failed("read", e) from e

    def _put(self, data: bytes, **cond: str) -> str | None:
        try:
            r = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **cond)
        except (ClientError, BotoCoreError) as e:
            if self._conflict(e):
                return None
            raise self._failed("write", e) from e
        return r["ETag"]

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, etag: str) -> str | None:
        return self._put(data, IfMatch=etag)

    def delete(self, etag: str | None) -> bool:
        try:
            kw = {"IfMatch": etag} if etag else {}
            self.client.delete_object(Bucket=self.bucket, Key=self.key, **kw)
        except (ClientError, BotoCoreError) as e:
            if self._conflict(e) or "NoSuchKey" in str(e):
                return False
            raise self._failed("delete", e) from e
        return True


def _backend(gallery_uri: str, storage: StorageConfig | None) -> _LocalObject | _S3Object:
    uri = uri_io.join(gallery_uri, LOCK_FILE)
    if uri_io.is_s3(uri):
        return _S3Object(uri, storage)
    return _LocalObject(uri_io.resolve(uri).path)


def _parse(data: bytes) -> LockInfo:
    return LockInfo(**json.loads(data))


def _dead_here(info: LockInfo) -> bool:
    """The holder ran on this host and its process is gone (killed, crashed): no need to wait
    for its lease to expire. A holder on another host is only judged by its expiry."""
    if info.host != socket.gethostname():
        return False
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class GalleryLock:
    """The gallery's lease. `acquire()` or refuse with LockHeld; `start_heartbeat()` renews it
    every ttl/3 in a thread; `release()` deletes it if it is still ours.

    `token` adopts a lease taken by someone else with that token (a scheduler that
    submitted this job): the job takes it over instead of being refused by it."""

    def __init__(
        self,
        gallery_uri: str,
        storage: StorageConfig | None = None,
        ttl_seconds: float = 900.0,
        owner: str = "carryover",
        purpose: str = "upgrade",
        token: str | None = None,
    ) -> None:
        self.gallery_uri = gallery_uri
        self.ttl = float(ttl_seconds)
        self.owner, self.purpose = owner, purpose
        self.token = token or secrets.token_hex(16)
        self._obj = _backend(gallery_uri, storage)
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def _body(self, acquired_at: float | None = None) -> bytes:
        now = time.time()
        info = LockInfo(
            self.token,
            self.owner,
            self.purpose,
            socket.gethostname(),
            os.getpid(),
            acquired_at or now,
            now + self.ttl,
        )
        return json.dumps(asdict(info)).encode()

    def holder(self) -> LockInfo | None:
        got = self._obj.get()
        return _parse(got[0]) if got else None

    def acquire(self) -> LockInfo:
        """Take the lease: create it, adopt it (same token), or take over an expired one."""
        for _ in range(5):
            etag = self._obj.create(self._body())
            if etag is not None:
                self._etag = etag
                return self._info()
            got = self._obj.get()
            if got is None:
                continue  # released in between: try to create again
            info = _parse(got[0])
            mine = info.token == self.token
            if not mine and not info.expired and not _dead_here(info):
                raise LockHeld(
                    f"gallery {self.gallery_uri} is locked by {info.describe()}; another "
                    f"upgrade of it is running. Wait for it, or if its holder is gone and you "
                    f"cannot wait for the lease to expire: carryover lock break {self.gallery_uri}"
                )
            acquired = info.acquired_at if mine else None
            etag = self._obj.replace(self._body(acquired), got[1])
            if etag is not None:
                self._etag = etag
                return self._info()
        raise LockHeld(f"gallery {self.gallery_uri}: the lock changed hands repeatedly; retry")

    def _info(self) -> LockInfo:
        got = self._obj.get()
        if got is None:
            raise LockLost(f"gallery {self.gallery_uri}: the lock vanished right after we took it")
        return _parse(got[0])

    def renew(self) -> None:
        """Push our lease's expiry out by ttl; LockLost if it is no longer ours."""
        for _ in range(5):
            got = self._obj.get()
            if got is None or _parse(got[0]).token != self.token:
                holder = _parse(got[0]).describe() if got else "nobody"
                raise LockLost(f"gallery {self.gallery_uri}: our lock is gone (now: {holder})")
            etag = self._obj.replace(self._body(_parse(got[0]).acquired_at), got[1])
            if etag is not None:  # else a co-holder (same token) renewed in between: re-read
                self._etag = etag
                return
        raise LockLost(f"gallery {self.gallery_uri}: could not renew the lock")

    def release(self) -> bool:
        """Delete the lease if it is still ours; True if it was."""
        self.stop_heartbeat()
        got = self._obj.get()
        if got is None or _parse(got[0]).token != self.token:
            return False
        return self._obj.delete(got[1])

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LockLost as e:
                self.lost = str(e)
                return
            except Exception:  # a transient storage error: the next beat tries again
                continue

    def start_heartbeat(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="gallery-lock", daemon=True)
            self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> GalleryLock:
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.release()  # nothing else failed: a failed release is the error to report
            return
        try:
            self.release()
        except Exception as e:  # never in place of the error already on its way out
            where = uri_io.join(self.gallery_uri, LOCK_FILE)
            log.warning(
                "could not release the lock %s (its lease lapses within %.0fs): %s",
                where,
                self.ttl,
                str(e).splitlines()[0] if str(e) else type(e).__name__,
            )


def break_lock(gallery_uri: str, storage: StorageConfig | None = None) -> LockInfo | None:
    """Remove the gallery's lease whoever holds it (an operator's last resort)."""
    obj = _backend(gallery_uri, storage)
    got = obj.get()
    if got is None:
        return None
    obj.delete(got[1])
    return _parse(got[0])


def holder_of(gallery_uri: str, storage: StorageConfig | None = None) -> LockInfo | None:
    got = _backend(gallery_uri, storage).get()
    return _parse(got[0]) if got else None
