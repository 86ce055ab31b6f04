"""The gallery's job journal: every submission and scheduler tick, one JSON object each, kept
in the gallery's own storage (`GALLERY/_jobs/`) so any host's `carryover jobs list` sees them."""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

from pipeline.config import ConfigError, StorageConfig
from pipeline.io import uri as uri_io
from pipeline.io.redact import redact, redact_text

JOURNAL_DIR = "_jobs"
JOB_ID_ENV = "CARRYOVER_JOB_ID"  # set in a submitted job's environment: runs are tagged with it
# What new_id makes (and Ray's own raysubmit_... ids): one plain name, never a path.
JOB_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}"


class JobIdError(ConfigError):
    """A job id that is not a plain name: it would become a path or a URL in the job API."""


def check_job_id(job_id: str) -> str:
    """The id itself if it is a plain name; JobIdError otherwise ("../x", "a/b", NUL, ...)."""
    if not isinstance(job_id, str) or not re.fullmatch(JOB_ID_PATTERN, job_id):
        raise JobIdError(f"job id {job_id!r} is not a plain name (letters, digits, '_', '.', '-')")
    return job_id


def new_id(prefix: str, gallery_name: str | None = None) -> str:
    """A sortable, unique id: <prefix>-[<gallery>-]<UTC time>-<random>."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    mid = f"{gallery_name}-" if gallery_name else ""
    return f"{prefix}-{mid}{stamp}-{secrets.token_hex(3)}"


class Journal:
    """Entries keyed by id under `GALLERY/_jobs/<id>.json` (each rewritten as it changes)."""

    def __init__(self, gallery_uri: str, storage: StorageConfig | None = None) -> None:
        self.base = uri_io.join(gallery_uri, JOURNAL_DIR)
        self.storage = storage

    def uri(self, entry_id: str, ext: str = "json") -> str:
        return uri_io.join(self.base, f"{check_job_id(entry_id)}.{ext}")

    def put(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Write an entry; credentials in it (URIs, secret-named keys) are masked first."""
        entry = {**redact(entry), "updated_at": time.time()}
        uri_io.write_json(self.uri(entry["id"]), entry, self.storage)
        return entry

    def update(self, entry_id: str, **changes: Any) -> dict[str, Any]:
        entry = self.get(entry_id) or {"id": entry_id}
        return self.put({**entry, **changes})

    def get(self, entry_id: str) -> dict[str, Any] | None:
        uri = self.uri(entry_id)  # a bad id is refused, not reported as missing
        try:
            return uri_io.read_json(uri, self.storage)
        except (FileNotFoundError, ValueError):
            return None

    def entries(self, limit: int = 50, kind: str | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        names = [
            n
            for n in uri_io.list_dir(self.base, self.storage)
            if n.endswith(".json") and re.fullmatch(JOB_ID_PATTERN, n[: -len(".json")])
        ]
        out = []
        for n in names:
            e = self.get(n[: -len(".json")])
            if e is not None and (kind is None or e.get("kind") == kind):
                out.append(e)
        out.sort(key=lambda e: e.get("created_at", 0), reverse=True)
        return out[:limit]

    def write_log(self, entry_id: str, text: str) -> str:
        """Keep a job's output; secret environment values and URI credentials are masked."""
        uri = self.uri(entry_id, "log")
        uri_io.write_bytes(uri, redact_text(text).encode(), self.storage)
        return uri

    def read_log(self, entry_id: str) -> str | None:
        try:
            return uri_io.read_bytes(self.uri(entry_id, "log"), self.storage).decode(
                errors="replace"
            )
        except FileNotFoundError:
            return None
