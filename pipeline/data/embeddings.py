"""Existing embedding files to adopt: Parquet (key + vector columns) or clip-retrieval's .npy."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.config import AdoptConfig, StorageConfig
from pipeline.data.shards import DataError, check_unique_keys, read_footer
from pipeline.io import uri as uri_io

NPY_DIR, META_DIR = "img_emb", "metadata"  # clip-retrieval's output folders
_NPY_RE = re.compile(r"^img_emb_(\d+)\.npy$")
_META_RE = re.compile(r"^metadata_(\d+)\.parquet$")


@dataclass(frozen=True)
class Columns:
    """Which input columns hold the key, the vector (Parquet layout) and the image location."""

    key: str
    embedding: str | None  # None: the .npy layout (vectors in the .npy file)
    image: str | None


@dataclass(frozen=True)
class SourceFile:
    """One input file: its vectors (Parquet, or .npy with its metadata Parquet beside it)."""

    uri: str  # the vectors: a Parquet file or an .npy file
    metadata: str | None  # .npy layout: the Parquet file of its keys, same rows, same order
    rows: int
    dim: int | None  # None: a variable-length list column (checked row by row when read)
    size: int  # bytes, both files together
    mtime: float | None
    npy_offset: int = 0  # .npy: byte where the rows start
    npy_dtype: str = ""

    @property
    def keys_uri(self) -> str:
        return self.metadata or self.uri

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input in commit records: a changed file is imported again."""
        return {"uri": self.uri, "metadata": self.metadata, "rows": self.rows, "size": self.size}


@dataclass(frozen=True)
class Sources:
    """The input files of an import, in order, and how to read them."""

    uri: str
    layout: str  # "parquet" | "npy"
    columns: Columns
    files: tuple[SourceFile, ...]

    @property
    def dim(self) -> int | None:
        return next((f.dim for f in self.files if f.dim is not None), None)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


@dataclass(frozen=True)
class RowBatch:
    """Consecutive rows of one input file: string keys, float32 vectors, image locations."""

    start: int  # row of the first one in its file
    keys: pa.Array
    embeddings: np.ndarray  # (n, dim) float32
    null_embedding: np.ndarray  # bool per row: no vector at all
    images: pa.Array | None


def find_sources(uri: str, cfg: AdoptConfig, storage: StorageConfig | None) -> Sources:
    """The input files under `uri`, checked from footers and headers alone: columns present
    and typed, .npy rows equal to their metadata rows, one dimension across files."""
    if not uri_io.is_s3(uri):  # recorded in the manifest: absolute, valid from anywhere
        uri = uri_io.resolve(uri).path
    layout, root = _layout(uri, cfg.layout, storage)
    cols = Columns(
        cfg.key(layout), None if layout == "npy" else cfg.embedding_column, cfg.image_column
    )
    files = (
        _npy_sources(root, cols, storage)
        if layout == "npy"
        else _parquet_sources(root, cols, storage)
    )
    if not files:
        raise FileNotFoundError(f"no embedding files under {uri}")
    first = next((f for f in files if f.dim is not None), None)
    for f in files:
        if first is not None and f.dim is not None and f.dim != first.dim:
            raise DataError(
                f"{f.uri}: {f.dim}-d embeddings, but {first.uri} holds {first.dim}-d: "
                "every file of a gallery must have one dimension"
            )
    return Sources(uri, layout, cols, tuple(files))


def _layout(uri: str, layout: str, storage: StorageConfig | None) -> tuple[str, str]:
    """(layout, root): `uri` itself or its embeddings/ folder when that holds img_emb/."""
    if not uri_io.exists(uri, storage):
        raise FileNotFoundError(f"no such file or directory: {uri}")
    if layout == "parquet":
        return layout, uri
    for root in (uri, uri_io.join(uri, "embeddings")):
        if any(_NPY_RE.match(n) for n in uri_io.list_dir(uri_io.join(root, NPY_DIR), storage)):
            return "npy", root
    if layout == "npy":
        raise FileNotFoundError(f"no {NPY_DIR}/img_emb_N.npy under {uri} (layout npy)")
    return "parquet", uri


def _info(uri: str, storage: StorageConfig | None) -> pafs.FileInfo:
    loc = uri_io.resolve(uri, storage)
    return uri_io.with_retries(lambda: loc.fs.get_file_info(loc.path), f"stat {uri}")


def _mtime(info: pafs.FileInfo) -> float | None:
    return info.mtime.timestamp() if info.mtime is not None else None


def _parquet_sources(root: str, cols: Columns, storage: StorageConfig | None) -> list[SourceFile]:
    out = []
    for f in uri_io.parquet_files(root, storage):
        schema, rows = read_footer(f, storage)
        _check_key_columns(schema, f, cols)
        if cols.embedding not in schema.names:
            raise DataError(
                f"{f}: missing embedding column {cols.embedding!r} (has {', '.join(schema.names)};"
                " set adopt.embedding_column)"
            )
        dim = _vector_dim(schema.field(cols.embedding).type, f, cols.embedding)
        info = _info(f, storage)
        out.append(SourceFile(f, None, rows, dim, info.size, _mtime(info)))
    return out


def _check_key_columns(schema: pa.Schema, uri: str, cols: Columns) -> None:
    """The key column (string or integer) and the image column, if one is named, are there."""
    for what, name in (("key", cols.key), ("image", cols.image)):
        if name is not None and name not in schema.names:
            raise DataError(
                f"{uri}: missing {what} column {name!r} (has {', '.join(schema.names)}; "
                f"set adopt.{what}_column)"
            )
    typ = schema.field(cols.key).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_integer(typ)):
        raise DataError(f"{uri}: key column {cols.key!r} must be strings or integers, got {typ}")


def _vector_dim(typ: pa.DataType, uri: str, name: str) -> int | None:
    """The vectors' dimension from a column type (None for a variable-length list)."""
    lists = (pa.types.is_fixed_size_list, pa.types.is_list, pa.types.is_large_list)
    if not any(t(typ) for t in lists) or not pa.types.is_floating(typ.value_type):
        raise DataError(f"{uri}: column {name!r} must be a list of floats, got {typ}")
    return typ.list_size if pa.types.is_fixed_size_list(typ) else None


def _numbered(folder: str, pattern: re.Pattern[str], storage: StorageConfig | None) -> dict:
    return {
        int(m.group(1)): uri_io.join(folder, n)
        for n in uri_io.list_dir(folder, storage)
        if (m := pattern.match(n))
    }


def _npy_sources(root: str, cols: Columns, storage: StorageConfig | None) -> list[SourceFile]:
    """img_emb/img_emb_N.npy paired with metadata/metadata_N.parquet by N (clip-retrieval
    pads N with zeros to the width of its partition count)."""
    npys = _numbered(uri_io.join(root, NPY_DIR), _NPY_RE, storage)
    metas = _numbered(uri_io.join(root, META_DIR), _META_RE, storage)
    for n in sorted(set(npys) ^ set(metas)):
        have, lacks = (npys[n], META_DIR) if n in npys else (metas[n], NPY_DIR)
        raise DataError(f"{have}: no matching file number {n} in {uri_io.join(root, lacks)}")
    out = []
    for n in sorted(npys):
        rows, dim, dtype, offset = npy_header(npys[n], storage)
        schema, meta_rows = read_footer(metas[n], storage)
        _check_key_columns(schema, metas[n], cols)
        if meta_rows != rows:
            first = min(rows, meta_rows)
            raise DataError(
                f"{npys[n]}: {rows} rows, but {metas[n]} has {meta_rows}: rows from {first} on "
                "have no partner (the Nth metadata row names the Nth vector)"
            )
        a, b = _info(npys[n], storage), _info(metas[n], storage)
        out.append(
            SourceFile(npys[n], metas[n], rows, dim, a.size + b.size, _mtime(a), offset, dtype)
        )
    return out


def npy_header(uri: str, storage: StorageConfig | None) -> tuple[int, int, str, int]:
    """(rows, dim, dtype, data offset) of a 2-d float .npy file, from its header alone. Object
    arrays are refused: loading them would unpickle."""
    loc = uri_io.resolve(uri, storage)
    with loc.fs.open_input_file(loc.path) as f:
        try:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read(f)
        except ValueError as e:
            raise DataError(f"{uri}: not a readable .npy file: {e}") from None
        offset = f.tell()
    if len(shape) != 2 or fortran:
        raise DataError(f"{uri}: must hold a C-order 2-d array (rows, dim), got shape {shape}")
    if dtype.kind != "f" or dtype.hasobject:
        raise DataError(f"{uri}: must hold float vectors, got dtype {dtype}")
    return int(shape[0]), int(shape[1]), dtype.str, offset


def check_dim(sources: Sources, dim: int, model: str) -> None:
    """Every file holds vectors of the model's dimension (DataError naming the first that
    does not; variable-length list columns are checked row by row as they are read)."""
    for f in sources.files:
        if f.dim is not None and f.dim != dim:
            raise DataError(
                f"{f.uri}: holds {f.dim}-d embeddings, but model {model!r} makes {dim}-d"
            )


def key_arrays(src: SourceFile, cols: Columns, storage: StorageConfig | None) -> Iterator[pa.Array]:
    """A file's keys as strings, in row order (the key column only is read)."""
    for b in uri_io.iter_parquet_batches(src.keys_uri, storage, [cols.key]):
        yield _as_strings(b.column(0))


def _as_strings(col: pa.Array) -> pa.Array:
    return col if pa.types.is_string(col.type) else pc.cast(col, pa.string())


def check_keys(sources: Sources, storage: StorageConfig | None) -> None:
    """Every key present and unique across all files (DataError naming file, row and key)."""
    files = sources.files
    check_unique_keys(
        [f.keys_uri for f in files],
        lambda i: key_arrays(files[i], sources.columns, storage),
        sources.rows,
    )


def iter_rows(
    src: SourceFile, cols: Columns, dim: int, storage: StorageConfig | None, batch_rows: int
) -> Iterator[RowBatch]:
    """Stream one input file's rows in order, `batch_rows` at a time (bounded memory); a row
    whose vector is not `dim` long is a DataError naming the file and row."""
    read = [c for c in (cols.key, cols.embedding, cols.image) if c is not None]
    with _npy_rows(src, storage) as npy:
        row = 0
        for b in uri_io.iter_parquet_batches(src.keys_uri, storage, read, batch_rows):
            if npy is not None:
                emb, null = npy(row, row + b.num_rows), np.zeros(b.num_rows, bool)
            else:
                emb, null = list_vectors(b.column(cols.embedding), dim, src.uri, row)
            images = b.column(cols.image) if cols.image else None
            yield RowBatch(row, _as_strings(b.column(cols.key)), emb, null, images)
            row += b.num_rows


@contextlib.contextmanager
def _npy_rows(src: SourceFile, storage: StorageConfig | None) -> Iterator[Any]:
    """A reader of rows [a, b) of an .npy file by ranged reads (local or s3://), or None for
    the Parquet layout: only the rows asked for are ever in memory."""
    if src.metadata is None:
        yield None
        return
    loc = uri_io.resolve(src.uri, storage)
    dtype, dim = np.dtype(src.npy_dtype), int(src.dim or 0)
    row_bytes = dtype.itemsize * dim
    with loc.fs.open_input_file(loc.path) as f:

        def rows(a: int, b: int) -> np.ndarray:
            data = f.read_at((b - a) * row_bytes, src.npy_offset + a * row_bytes)
            if len(data) != (b - a) * row_bytes:
                raise DataError(f"{src.uri}: truncated: rows {a}..{b - 1} are not all there")
            return np.frombuffer(data, dtype).reshape(b - a, dim).astype(np.float32)

        yield rows


def list_vectors(col: pa.Array, dim: int, uri: str, first: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 from a list column (null rows zero), and which rows are null. A row of
    another length is a DataError naming the file and row (`first`: the batch's first row)."""
    null = col.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(col.type):
        lengths = np.full(len(col), col.type.list_size)
    else:
        lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~null & (lengths != dim))
    if bad.size:
        raise DataError(
            f"{uri}: row {first + int(bad[0])}: embedding has {int(lengths[bad[0]])} values, "
            f"expected {dim} (every row must have the model's dimension)"
        )
    out = np.zeros((len(col), dim), np.float32)
    if pa.types.is_fixed_size_list(col.type):  # null slots hold values too: drop them
        values = col.values.slice(col.offset * dim, len(col) * dim)
        out[:] = values.to_numpy(zero_copy_only=False).reshape(len(col), dim)
        out[null] = 0.0
    elif (~null).any():
        out[~null] = pc.list_flatten(col).to_numpy(zero_copy_only=False).reshape(-1, dim)
    return out, null
