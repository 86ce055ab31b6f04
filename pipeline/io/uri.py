"""URIs and filesystems: local paths and s3:// through pyarrow, atomic writes, retries."""

from __future__ import annotations

import contextlib
import json
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import StorageConfig

T = TypeVar("T")


class StorageError(OSError):
    """A storage operation failed permanently; the message names the object."""


@dataclass(frozen=True)
class Location:
    """A resolved URI: the pyarrow filesystem and the path inside it."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    st = storage.resolved()
    kwargs: dict[str, Any] = {"region": st.region}
    if st.endpoint_url:
        scheme, _, host = st.endpoint_url.partition("://")
        kwargs["endpoint_override"] = host or scheme
        kwargs["scheme"] = scheme if host else "https"
    if st.anon:
        kwargs["anonymous"] = True
    elif st.access_key_id and st.secret_access_key:
        kwargs["access_key"] = st.access_key_id.get_secret_value()
        kwargs["secret_key"] = st.secret_access_key.get_secret_value()
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=max(1, st.retries))
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, storage: StorageConfig | None = None) -> Location:
    """Map a URI (local path, file://, s3://bucket/key) to a pyarrow filesystem and path."""
    storage = storage or StorageConfig()
    if is_s3(uri):
        return Location(_s3_filesystem(storage), uri[len("s3://") :].rstrip("/"), uri.rstrip("/"))
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return Location(pafs.LocalFileSystem(), str(Path(path).expanduser().resolve()), uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts under a URI, refusing anything that would escape it (.., absolute)."""
    out = uri.rstrip("/")
    for part in parts:
        for piece in PurePosixPath(part).parts:
            if piece in ("..", "/", "") or "\\" in piece or piece.startswith("/"):
                raise ValueError(f"path part {part!r} would escape {uri!r}")
        out = f"{out}/{part.strip('/')}"
    return out


def with_retries(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Run a storage call, retrying transient OSErrors with jittered exponential backoff."""
    last: Exception | None = None
    for i in range(max(1, attempts)):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError as e:  # pyarrow raises OSError subclasses for network/S3 faults
            last = e
            if i + 1 < attempts:
                time.sleep(base_delay * (2**i) * (0.5 + random.random()))
    raise StorageError(f"{what}: failed after {attempts} attempts: {last}") from last


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    loc = resolve(uri, storage)
    info = with_retries(lambda: loc.fs.get_file_info(loc.path), f"stat {uri}")
    return info.type != pafs.FileType.NotFound


def is_file(uri: str, storage: StorageConfig | None = None) -> bool:
    loc = resolve(uri, storage)
    info = with_retries(lambda: loc.fs.get_file_info(loc.path), f"stat {uri}")
    return info.type == pafs.FileType.File


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    loc = resolve(uri, storage)

    def _read() -> bytes:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()

    try:
        return with_retries(_read, f"read {uri}")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None


def sha256(uri: str, storage: StorageConfig | None = None, chunk: int = 8 << 20) -> str:
    """Hex SHA-256 of an object, streamed in `chunk`-byte reads (never the whole file in memory)."""
    import hashlib

    loc = resolve(uri, storage)

    def _hash() -> str:
        h = hashlib.sha256()
        with loc.fs.open_input_stream(loc.path) as f:
            while block := f.read(chunk):
                h.update(block)
        return h.hexdigest()

    try:
        return with_retries(_hash, f"read {uri}")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None


@contextlib.contextmanager
def open_atomic(uri: str, storage: StorageConfig | None = None) -> Iterator[Any]:
    """Open an output stream whose content becomes visible at `uri` only once complete.

    Local: write a hidden temporary sibling, then rename over the target (atomic on POSIX).
    S3: a PUT or multipart upload is only visible once completed, so write in place; on
    error the upload is aborted and nothing appears.
    """
    loc = resolve(uri, storage)
    parent = str(PurePosixPath(loc.path).parent)
    if not loc.is_s3:
        loc.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{PurePosixPath(loc.path).name}"
        try:
            with loc.fs.open_output_stream(tmp) as f:
                yield f
            loc.fs.move(tmp, loc.path)
        except BaseException:
            with contextlib.suppress(OSError):
                loc.fs.delete_file(tmp)
            raise
    else:
        stream = loc.fs.open_output_stream(loc.path)
        try:
            yield stream
        except BaseException:
            # Aborting avoids completing a partial multipart upload.
            with contextlib.suppress(Exception):
                stream.abort()
            raise
        stream.close()


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write a whole object atomically, retrying transient failures."""

    def _write() -> None:
        with open_atomic(uri, storage) as f:
            f.write(data)

    with_retries(_write, f"write {uri}")


def read_json(uri: str, storage: StorageConfig | None = None) -> Any:
    raw = read_bytes(uri, storage)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri}: not valid JSON: {e}") from e


def write_json(uri: str, obj: Any, storage: StorageConfig | None = None) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode(), storage)


def list_dir(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """Names (not paths) directly under a directory URI; empty if it does not exist."""
    loc = resolve(uri, storage)
    sel = pafs.FileSelector(loc.path, allow_not_found=True, recursive=False)
    infos = with_retries(lambda: loc.fs.get_file_info(sel), f"list {uri}")
    return sorted(PurePosixPath(i.path).name for i in infos)


def delete(uri: str, storage: StorageConfig | None = None) -> None:
    """Delete a file or a directory tree; missing is fine."""
    loc = resolve(uri, storage)
    info = with_retries(lambda: loc.fs.get_file_info(loc.path), f"stat {uri}")
    if info.type == pafs.FileType.Directory:
        with_retries(lambda: loc.fs.delete_dir(loc.path), f"delete {uri}")
    elif info.type == pafs.FileType.File:
        with_retries(lambda: loc.fs.delete_file(loc.path), f"delete {uri}")


def parquet_files(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """The Parquet files a URI names: itself if a file, else the sorted *.parquet under it."""
    loc = resolve(uri, storage)
    info = with_retries(lambda: loc.fs.get_file_info(loc.path), f"stat {uri}")
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or directory: {uri}")
    if info.type == pafs.FileType.File:
        return [uri]
    names = [n for n in list_dir(uri, storage) if n.endswith(".parquet") and not n.startswith(".")]
    return [join(uri, n) for n in names]


def parquet_num_rows(uri: str, storage: StorageConfig | None = None) -> int:
    """Row count from the Parquet footer, without reading data."""
    loc = resolve(uri, storage)

    def _rows() -> int:
        with loc.fs.open_input_file(loc.path) as f:
            return pq.ParquetFile(f).metadata.num_rows

    return with_retries(_rows, f"read footer of {uri}")


def read_table(
    uri: str, storage: StorageConfig | None = None, columns: list[str] | None = None
) -> pa.Table:
    loc = resolve(uri, storage)
    try:
        return with_retries(
            lambda: pq.read_table(loc.path, filesystem=loc.fs, columns=columns), f"read {uri}"
        )
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None


def iter_parquet_batches(
    uri: str,
    storage: StorageConfig | None = None,
    columns: list[str] | None = None,
    batch_size: int = 65536,
) -> Iterator[pa.RecordBatch]:
    """Stream a Parquet file in record batches (bounded memory)."""
    loc = resolve(uri, storage)
    with loc.fs.open_input_file(loc.path) as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def write_table(table: pa.Table, uri: str, storage: StorageConfig | None = None) -> None:
    """Write a Parquet file atomically."""

    def _write() -> None:
        with open_atomic(uri, storage) as f:
            pq.write_table(table, f)

    with_retries(_write, f"write {uri}")


class ParquetStreamWriter:
    """Append record batches to one Parquet file that appears atomically on `close()`."""

    def __init__(self, uri: str, schema: pa.Schema, storage: StorageConfig | None = None):
        self.uri = uri
        self.rows = 0
        self._ctx = open_atomic(uri, storage)
        self._stream = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(self._stream, schema)

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows:
            self._writer.write(batch)
            self.rows += batch.num_rows

    def close(self) -> None:
        self._writer.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(Exception):
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
