"""Versioned embedding store: shard files, per-shard commit records, manifest, CURRENT pointer."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import StorageConfig
from pipeline.io import uri as uri_io

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class GalleryError(RuntimeError):
    """The gallery is missing, incomplete or inconsistent; the message says where."""


def embedding_schema(
    dim: int, with_side_info: int = 0, uncertainty: bool = False, chains: bool = False
) -> pa.Schema:
    """Schema of a gallery shard: key, fixed-size float32 embedding, how it was produced.

    Optional: FCT's side-information (carried through upgrades, the next one needs it) and,
    in an upgrade's output, each row's accumulated log-variance (null where none is known),
    its chain of models since it was embedded ("v1>v2>v3") and its number of maps (hops).
    """
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
    if with_side_info:
        fields.append(pa.field("side_info", pa.list_(pa.float32(), with_side_info)))
    if uncertainty:
        fields.append(pa.field("uncertainty", pa.float32()))
    if chains:
        fields.append(pa.field("chain", pa.string()))
        fields.append(pa.field("hops", pa.int16()))
    return pa.schema(fields)


def check_name(value: Any, what: str) -> str:
    """A version, model or shard file name as stored: one plain path segment (it becomes part
    of an object key, so "..", "a/b", absolute paths and control characters are refused)."""
    if not isinstance(value, str) or not re.fullmatch(VERSION_PATTERN, value):
        raise GalleryError(
            f"{what} {value!r} is not a plain name (a letter or digit, then letters, digits, "
            "'_', '.', '-'; at most 64)"
        )
    return value


REJECT_SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("reason", pa.string())])


def shard_file(shard_id: int) -> str:
    return f"shard-{shard_id:05d}.parquet"


def embeddings_to_arrow(emb: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) float32 → Arrow fixed-size list without copying the values."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])


def check_embedding_type(typ: pa.DataType, dim: int | None = None) -> str | None:
    """Why an Arrow type cannot hold embeddings (of `dim` values), or None when it can."""
    if not pa.types.is_fixed_size_list(typ) or not pa.types.is_floating(typ.value_type):
        return f"must be a fixed-size list of float32, got {typ}"
    if dim is not None and typ.list_size != dim:
        return f"holds {typ.list_size}-d vectors, expected {dim}-d"
    return None


def arrow_to_embeddings(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow fixed-size list column → (n, d) float32 (zero-copy per chunk where possible)."""
    if why := check_embedding_type(col.type):
        raise ValueError(f"embedding column {why}")
    if isinstance(col, pa.ChunkedArray):
        if col.num_chunks == 0:
            return np.zeros((0, col.type.list_size), np.float32)
        col = pa.concat_arrays(col.chunks) if col.num_chunks > 1 else col.chunk(0)
    d = col.type.list_size
    flat = col.flatten() if col.offset else col.values
    return flat.to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32, copy=False)


def space_of(manifest: dict[str, Any], version: str) -> str:
    """The model whose embedding space a version's rows are in: its manifest's `model`, else
    (versions written before manifests named it) the version's own name."""
    return manifest.get("model") or version


@dataclass
class Gallery:
    """A gallery rooted at a URI (local or s3://)."""

    uri: str
    storage: StorageConfig | None = None

    def path(self, *parts: str) -> str:
        if len(parts) > 1 and parts[0] == "versions":  # every version's objects pass here
            check_name(parts[1], "version")
        return uri_io.join(self.uri, *parts)

    def version_uri(self, version: str) -> str:
        return self.path("versions", version)

    def shard_uri(self, version: str, shard_id: int) -> str:
        return self.path("versions", version, shard_file(shard_id))

    def rejects_uri(self, version: str, shard_id: int) -> str:
        return self.path("versions", version, "rejects", shard_file(shard_id))

    def record_uri(self, version: str, shard_id: int) -> str:
        return self.path("versions", version, "_shards", f"shard-{shard_id:05d}.json")

    def fallbacks_uri(self, version: str, shard_id: int) -> str:
        return self.path("versions", version, "fallbacks", shard_file(shard_id))

    def attempt_uri(self, version: str, shard_id: int, attempt: str) -> str:
        return self.path("versions", version, "_attempts", f"shard-{shard_id:05d}-{attempt}.json")

    def attempts(self, version: str) -> dict[int, int]:
        """How many times each shard of a version in progress was started (shard id → count)."""
        out: dict[int, int] = {}
        for name in uri_io.list_dir(self.path("versions", version, "_attempts"), self.storage):
            if name.startswith("shard-") and name.endswith(".json"):
                sid = int(name.split("-")[1])
                out[sid] = out.get(sid, 0) + 1
        return out

    def index_uri(self, version: str) -> str:
        return self.path("versions", version, "index")

    # -- versions ---------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Complete versions (those whose manifest exists), oldest first."""
        created: dict[str, float] = {}
        for v in uri_io.list_dir(self.path("versions"), self.storage):
            if not re.fullmatch(VERSION_PATTERN, v):
                continue  # not a version carryover could have written
            try:  # one read per version: a missing manifest means the version is unfinished
                m = uri_io.read_json(self.path("versions", v, MANIFEST), self.storage)
            except FileNotFoundError:
                continue
            created[v] = m.get("created_at", 0)
        return sorted(created, key=lambda v: created[v])

    def has_version(self, version: str) -> bool:
        """Whether a complete version of that name exists; a name no version can have (a
        label such as "v2 (planned)", a path) is simply not one, never a path to look at."""
        if not isinstance(version, str) or not re.fullmatch(VERSION_PATTERN, version):
            return False
        return uri_io.exists(self.path("versions", version, MANIFEST), self.storage)

    def manifest(self, version: str) -> dict[str, Any]:
        """A version's manifest; names in it that later become paths must be plain names."""
        uri = self.path("versions", version, MANIFEST)
        try:
            m = uri_io.read_json(uri, self.storage)
        except FileNotFoundError:
            raise GalleryError(f"{self.uri}: version {version!r} has no manifest") from None
        for key in ("model", "source_version"):
            if m.get(key) is not None:
                check_name(m[key], f"{uri}: {key}")
        for rec in m.get("shards", []):
            check_name(rec.get("path"), f"{uri}: shard {rec.get('shard_id')} path")
        return m

    # -- shards -----------------------------------------------------------------------------
    def committed_shards(self, version: str) -> dict[int, dict[str, Any]]:
        """Per-shard completion records of a version in progress (shard id → record)."""
        base = self.path("versions", version, "_shards")
        out = {}
        for name in uri_io.list_dir(base, self.storage):
            if name.endswith(".json") and not name.startswith("."):
                rec = uri_io.read_json(uri_io.join(base, name), self.storage)
                out[int(rec["shard_id"])] = rec
        return out

    def commit_shard(self, version: str, record: dict[str, Any]) -> None:
        """Record a shard as done: its file is complete, so its record may appear."""
        uri_io.write_json(self.record_uri(version, int(record["shard_id"])), record, self.storage)

    def file_checksum(self, file_uri: str) -> str:
        return "sha256:" + uri_io.sha256(file_uri, self.storage)

    def finalize(self, version: str, meta: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest last, from the commit records: the version becomes visible."""
        records = self.committed_shards(version)
        shards = [records[k] for k in sorted(records)]
        manifest = {
            "version": version,
            "created_at": time.time(),
            "rows": sum(r["rows"] for r in shards),
            "rejected": sum(r.get("rejected", 0) for r in shards),
            "shards": shards,
            **meta,
        }
        uri_io.write_json(self.path("versions", version, MANIFEST), manifest, self.storage)
        return manifest

    def iter_embeddings(
        self,
        version: str,
        columns: tuple[str, ...] = ("key", "embedding"),
        batch_size: int = 65536,
        records: list[dict[str, Any]] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Stream every row of a version shard by shard (its manifest's, or the given records).

        A shard file lacking a column, or whose embeddings are not the manifest's dimension,
        raises GalleryError naming the file (pyarrow would silently drop a missing column).
        """
        dim = None
        if records is None:
            m = self.manifest(version)
            records, dim = m["shards"], m.get("embedding_dim")
        for rec in records:
            file_uri = self.path("versions", version, rec["path"])
            batches = uri_io.iter_parquet_batches(file_uri, self.storage, list(columns), batch_size)
            for i, b in enumerate(batches):
                if i == 0:  # one schema per file
                    self._check_columns(file_uri, b.schema, columns, dim)
                yield b

    @staticmethod
    def _check_columns(
        file_uri: str, schema: pa.Schema, columns: tuple[str, ...], dim: int | None
    ) -> None:
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise GalleryError(f"{file_uri}: missing column(s) {missing} (has {schema.names})")
        for c in ("embedding", "side_info"):
            if c in columns:
                why = check_embedding_type(schema.field(c).type, dim if c == "embedding" else None)
                if why:
                    raise GalleryError(f"{file_uri}: column {c!r} {why}")

    # -- serving pointer --------------------------------------------------------------------
    def current_state(self) -> dict[str, Any] | None:
        try:
            state = uri_io.read_json(self.path(CURRENT), self.storage)
        except FileNotFoundError:
            return None
        check_name(state.get("version"), f"{self.path(CURRENT)}: version")
        return state

    def current(self) -> str | None:
        state = self.current_state()
        return state["version"] if state else None

    def promote(self, version: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Point CURRENT at a complete version in one atomic object write."""
        check_name(version, "version")
        if not self.has_version(version):
            raise GalleryError(f"{self.uri}: cannot promote {version!r}: it has no manifest")
        prev = self.current_state()
        history = ([prev["version"]] + prev.get("history", [])) if prev else []
        if history and history[0] == version:
            history = history[1:]
        state = {
            "version": version,
            "history": history[:50],
            "promoted_at": time.time(),
            **(extra or {}),
        }
        uri_io.write_json(self.path(CURRENT), state, self.storage)
        return state

    def current_bytes(self) -> bytes | None:
        """CURRENT as stored (None: absent), to put back exactly if a paired move fails."""
        try:
            return uri_io.read_bytes(self.path(CURRENT), self.storage)
        except FileNotFoundError:
            return None

    def restore_current(self, saved: bytes | None) -> None:
        """Put CURRENT back as `current_bytes` read it (absent stays absent)."""
        if saved is None:
            uri_io.delete(self.path(CURRENT), self.storage)
        else:
            uri_io.write_bytes(self.path(CURRENT), saved, self.storage)

    def rollback_target(self) -> str:
        """The version a rollback would serve: the previously served one, still complete."""
        state = self.current_state()
        if not state or not state.get("history"):
            raise GalleryError(f"{self.uri}: nothing to roll back to (no earlier promoted version)")
        target = state["history"][0]
        if not self.has_version(target):
            raise GalleryError(f"{self.uri}: previous version {target!r} is gone")
        return target

    def rollback(self) -> dict[str, Any]:
        """Point CURRENT back at the previously served version."""
        target = self.rollback_target()
        state = self.current_state() or {}  # rollback_target checked it has a history
        rest = state["history"][1:]
        new = {
            "version": target,
            "history": rest,
            "promoted_at": time.time(),
            "rolled_back_from": state["version"],
        }
        uri_io.write_json(self.path(CURRENT), new, self.storage)
        return new
