"""URIs and filesystems: local paths and s3:// through pyarrow, atomic writes, retries."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.config import StorageConfig

T = TypeVar("T")
READ_ATTEMPTS = 5  # tries of one streamed read, as with_retries' default


class StorageError(OSError):
    """A storage operation failed permanently; the message names the object."""


class UnsafeFileError(StorageError):
    """A stored file holds what carryover refuses to read (it could run code when read)."""


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


def absolute(uri: str) -> str:
    """The URI to record: s3:// and file:// unchanged, a local path made absolute, so a record
    means the same file wherever the command that reads it runs."""
    if is_s3(uri) or uri.startswith("file://"):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def from_record(uri: str | None, workdir: str) -> str | None:
    """A file URI read from a record: absolute ones as they are; a relative local path (records
    written before paths were made absolute were relative to where the command ran, which held
    the workdir) under the workdir's parent when it starts with the workdir's name
    (`.carryover/images/shard-00000.parquet`), else under the workdir."""
    if not uri or is_s3(uri) or uri.startswith("file://") or os.path.isabs(uri):
        return uri
    base = Path(workdir).expanduser().absolute()
    parts = PurePosixPath(uri).parts
    if parts and parts[0] == base.name:
        return os.path.normpath(base.parent / uri)
    return os.path.normpath(base / uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts under a URI, refusing anything that would escape it (.., absolute) or
    that a filesystem would cut short (NUL and other control characters)."""
    out = uri.rstrip("/")
    for part in parts:
        if not isinstance(part, str) or any(ord(c) < 32 or c == "\x7f" for c in part):
            raise ValueError(f"path part {part!r} under {uri!r}: not a plain name")
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

    Write a hidden temporary sibling, then move it over the target: a rename on a local disk
    (atomic on POSIX), a server-side copy on S3 (atomic per object) and a delete. On S3 the
    stream never writes to `uri` itself: pyarrow's S3 streams cannot be aborted from Python,
    and closing one (a Parquet writer closes its sink even on error) completes the upload,
    which would publish a partial object.
    """
    loc = resolve(uri, storage)
    parent = str(PurePosixPath(loc.path).parent)
    if not loc.is_s3:  # S3 has no directories to make
        loc.fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{PurePosixPath(loc.path).name}"
    try:
        with loc.fs.open_output_stream(tmp) as f:
            yield f
        if loc.is_s3:
            _s3_move(tmp, loc, storage)
        else:
            loc.fs.move(tmp, loc.path)
    except BaseException:
        with contextlib.suppress(OSError):
            if loc.is_s3:
                _s3_delete(tmp, storage)
            else:
                loc.fs.delete_file(tmp)
        raise


def _s3_move(tmp: str, dst: Location, storage: StorageConfig | None) -> None:
    """Copy a finished temporary object over `dst` server side, then delete it. Through
    botocore: pyarrow's move would also write an empty directory-marker object each time."""
    bucket, _, key = dst.path.partition("/")
    src = {"Bucket": bucket, "Key": tmp.partition("/")[2]}
    try:
        _s3_client(storage).copy_object(Bucket=bucket, Key=key, CopySource=src)
    except (BotoCoreError, ClientError) as e:
        raise OSError(f"copy {src['Key']} to {dst.uri}: {e}") from e
    with contextlib.suppress(OSError):  # the object is in place; a hidden leftover is harmless
        _s3_delete(tmp, storage)


def _s3_delete(path: str, storage: StorageConfig | None) -> None:
    bucket, _, key = path.partition("/")
    try:
        _s3_client(storage).delete_object(Bucket=bucket, Key=key)
    except (BotoCoreError, ClientError) as e:
        raise OSError(f"delete s3://{path}: {e}") from e


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write a whole object atomically, retrying transient failures."""

    def _write() -> None:
        with open_atomic(uri, storage) as f:
            f.write(data)

    with_retries(_write, f"write {uri}")


_S3_CLIENTS: dict[tuple[Any, ...], Any] = {}
_S3_CLIENTS_LOCK = threading.Lock()


def _s3_client(storage: StorageConfig | None) -> Any:
    """A botocore S3 client for these settings, made once per process (a client is
    thread-safe, but must not cross a fork)."""
    st = (storage or StorageConfig()).resolved()
    creds = None
    if st.access_key_id and st.secret_access_key and not st.anon:
        creds = (st.access_key_id.get_secret_value(), st.secret_access_key.get_secret_value())
    key = (os.getpid(), st.endpoint_url, st.region, st.anon, creds, st.retries)
    with _S3_CLIENTS_LOCK:
        if key not in _S3_CLIENTS:
            # start-up: botocore's session and config cost ~0.15 s; only s3:// URIs need them.
            import botocore.session
            from botocore import UNSIGNED
            from botocore.config import Config

            config = Config(
                retries={"max_attempts": max(1, st.retries), "mode": "standard"},
                signature_version=UNSIGNED if st.anon else None,
            )
            kw = {"aws_access_key_id": creds[0], "aws_secret_access_key": creds[1]} if creds else {}
            _S3_CLIENTS[key] = botocore.session.get_session().create_client(
                "s3", region_name=st.region, endpoint_url=st.endpoint_url, config=config, **kw
            )
        return _S3_CLIENTS[key]


def _read_s3_whole(uri: str, storage: StorageConfig | None) -> bytes:
    """An S3 object in one GET, so every byte comes from one version of it. pyarrow reads an
    object's size with a HEAD, then GETs that byte range: one replaced in between (CURRENT on a
    promote) reads as its new bytes cut to, or padded out to, its old length."""
    bucket, _, key = resolve(uri, storage).path.partition("/")
    try:
        return _s3_client(storage).get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            raise FileNotFoundError(f"no such file: {uri}") from None
        raise OSError(str(e)) from e
    except BotoCoreError as e:  # connection lost, body cut short: with_retries tries again
        raise OSError(str(e)) from e


def read_json(uri: str, storage: StorageConfig | None = None) -> Any:
    """A JSON object, read whole. JSON objects (CURRENT, stage and journal records) are
    replaced while others read them: on S3 they are read in one GET, never a HEAD + ranged GET."""
    if is_s3(uri):
        raw = with_retries(lambda: _read_s3_whole(uri, storage), f"read {uri}")
    else:
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
    if info.type == pafs.FileType.NotFound:
        return
    remove = loc.fs.delete_dir if info.type == pafs.FileType.Directory else loc.fs.delete_file

    def _delete() -> None:
        # FileNotFoundError: an earlier try got there before its answer was lost: done.
        with contextlib.suppress(FileNotFoundError):
            remove(loc.path)

    with_retries(_delete, f"delete {uri}")


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


def _footer(uri: str, storage: StorageConfig | None, read: Callable[[pq.ParquetFile], T]) -> T:
    loc = resolve(uri, storage)

    def _read() -> T:
        with loc.fs.open_input_file(loc.path) as f:
            return read(pq.ParquetFile(f))

    return with_retries(_read, f"read footer of {uri}")


def parquet_num_rows(uri: str, storage: StorageConfig | None = None) -> int:
    """Row count from the Parquet footer, without reading data."""
    return _footer(uri, storage, lambda pf: pf.metadata.num_rows)


def parquet_columns(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """Column names from the Parquet footer, without reading data."""
    return _footer(uri, storage, lambda pf: list(pf.schema_arrow.names))


def read_table(
    uri: str, storage: StorageConfig | None = None, columns: list[str] | None = None
) -> pa.Table:
    loc = resolve(uri, storage)
    try:
        table = with_retries(
            lambda: pq.read_table(loc.path, filesystem=loc.fs, columns=columns), f"read {uri}"
        )
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None
    check_plain_schema(table.schema, uri)
    return table


def iter_parquet_batches(
    uri: str,
    storage: StorageConfig | None = None,
    columns: list[str] | None = None,
    batch_size: int = 65536,
) -> Iterator[pa.RecordBatch]:
    """Stream a Parquet file in record batches (bounded memory), retrying transient errors.

    A stream cannot be retried as one call: a read that fails part-way reopens the file and
    skips the batches already handed out (re-decoding them, only on that rare path)."""
    loc = resolve(uri, storage)

    def _batches(skip: int) -> Iterator[pa.RecordBatch]:
        with loc.fs.open_input_file(loc.path) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            check_plain_schema(
                pa.schema([schema.field(c) for c in columns if c in schema.names])
                if columns is not None
                else schema,
                uri,
            )
            for i, b in enumerate(pf.iter_batches(batch_size=batch_size, columns=columns)):
                if i >= skip:
                    yield b

    done = failures = 0
    it = _batches(0)
    try:
        while True:
            try:
                b = next(it)
            except StopIteration:
                return
            except (FileNotFoundError, StorageError):
                raise
            except OSError as e:  # as in with_retries: jittered exponential backoff
                failures += 1
                if failures >= READ_ATTEMPTS:
                    raise StorageError(f"read {uri}: failed after {failures} attempts: {e}") from e
                time.sleep(0.2 * 2 ** (failures - 1) * (0.5 + random.random()))
                it.close()
                it = _batches(done)
                continue
            yield b
            done += 1
    finally:
        it.close()


def _extension_in(typ: pa.DataType) -> str | None:
    """The name of an Arrow extension type in `typ` (nested in lists/structs/maps), if any."""
    if isinstance(typ, pa.BaseExtensionType):
        return getattr(typ, "extension_name", str(typ))
    children: list[pa.DataType] = []
    if isinstance(typ, (pa.ListType, pa.LargeListType, pa.FixedSizeListType)):
        children = [typ.value_type]
    elif isinstance(typ, pa.StructType):
        children = [typ.field(i).type for i in range(typ.num_fields)]
    elif isinstance(typ, pa.MapType):
        children = [typ.key_type, typ.item_type]
    for child in children:
        if found := _extension_in(child):
            return found
    return None


def check_plain_schema(schema: pa.Schema, uri: str) -> None:
    """Refuse stored Parquet columns of an extension type. Once Ray Data is imported, a column
    tagged `ray.data.arrow_pickled_object` unpickles its values when read: a crafted shard
    would run code. carryover's shards hold plain Arrow types only."""
    for field in schema:
        if ext := _extension_in(field.type):
            raise UnsafeFileError(
                f"{uri}: column {field.name!r} has the Arrow extension type {ext!r}; carryover "
                "reads plain Arrow types only (an extension type can unpickle code when read)"
            )


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

        def _open() -> tuple[Any, Any]:
            ctx = open_atomic(uri, storage)
            return ctx, ctx.__enter__()

        # Opening is retried; appends cannot be (a stream is not replayable), so a failed
        # write raises naming the file and its caller redoes the shard whole.
        self._ctx, self._stream = with_retries(_open, f"open {uri} for writing")
        self._writer = pq.ParquetWriter(self._stream, schema)

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows:
            try:
                self._writer.write(batch)
            except OSError as e:
                raise StorageError(f"write {self.uri}: {e}") from e
            self.rows += batch.num_rows

    def close(self) -> None:
        """Finish the file and make it visible at `uri`; if that fails, nothing appears."""
        try:
            self._writer.close()
            self._ctx.__exit__(None, None, None)
        except OSError as e:
            self.abort()
            raise StorageError(f"write {self.uri}: {e}") from e

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(Exception):
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
