"""Redaction: what leaves the process (MLflow, logs, job metadata, the journal) holds no secret."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
# Substrings of a key that mark its value as a credential. Over-matching (e.g. "tokenizer")
# only hides a harmless value; under-matching would leak a secret into a shared server.
SECRET_MARKERS = ("secret", "password", "passwd", "token", "access_key", "api_key", "credential")
# Environment values shorter than this are not scrubbed from text: masking every "1" or "yes"
# would garble messages and hide nothing a real credential looks like.
MIN_SCRUB_LENGTH = 8

# user:password@ (or a bare token@) inside a URI; a password may contain ":" but not "@" or "/".
_URI_USER_PASSWORD = re.compile(r"(://)[^/\s:@]+:[^/\s@]+@")
_URI_TOKEN = re.compile(r"(://)[^/\s:@*]+@")
# ?token=...&X-Amz-Signature=... in a URL's query string.
_QUERY_SECRET = re.compile(
    r"([?&][^=&\s]*(?:secret|password|token|signature|credential|api_key)[^=&\s]*=)[^&\s#]+",
    re.IGNORECASE,
)


def is_secret_key(key: str) -> bool:
    """True if the key's name says its value is a credential."""
    k = str(key).lower().replace("-", "_")
    return any(marker in k for marker in SECRET_MARKERS)


def uri_has_credentials(text: str) -> bool:
    """True if the text holds a URI with a user:password@ or token@ part, or a secret query."""
    return bool(
        _URI_USER_PASSWORD.search(text) or _URI_TOKEN.search(text) or _QUERY_SECRET.search(text)
    )


def env_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-named environment variables (AWS_SECRET_ACCESS_KEY, RAY_AUTH_TOKEN,
    MLFLOW_TRACKING_PASSWORD, ...), longest first so a longer secret is masked whole."""
    env = os.environ if environ is None else environ
    # a snapshot of the names, then .get: another thread (MLflow's telemetry) may delete a
    # variable while we read, and iterating os.environ's items would raise KeyError
    values = (env.get(k) for k in list(env) if is_secret_key(k))
    found = {v for v in values if v and len(v) >= MIN_SCRUB_LENGTH}
    return sorted(found, key=len, reverse=True)


def redact_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Mask URI credentials and every secret environment value that appears in `text`."""
    return _redact_text(text, env_secrets(environ))


def redact(obj: Any, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of a JSON-like value fit to log: secret-named keys masked (unset ones stay unset),
    pydantic secrets masked, and every string passed through `redact_text`."""
    return _redact(obj, env_secrets(environ))


def _redact_text(text: str, secrets: list[str]) -> str:
    text = _URI_USER_PASSWORD.sub(r"\1***:***@", text)
    text = _URI_TOKEN.sub(r"\1***@", text)
    text = _QUERY_SECRET.sub(r"\1***", text)
    for value in secrets:
        text = text.replace(value, MASK)
    return text


def _redact(obj: Any, secrets: list[str]) -> Any:
    if type(obj).__name__ == "SecretStr":  # pydantic secret: never reveal, whatever the key
        return MASK
    if isinstance(obj, Mapping):
        return {
            k: MASK if is_secret_key(k) and v not in (None, "") else _redact(v, secrets)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [_redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        return _redact_text(obj, secrets)
    return obj
