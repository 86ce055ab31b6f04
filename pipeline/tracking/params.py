"""Turn nested config and result dicts into MLflow-safe params and tags: flat, masked, truncated."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

# One place decides what is a secret and how it is masked: pipeline.io.redact.
from pipeline.io.redact import MASK, is_secret_key, redact_text

# MLflow's own limits (mlflow.utils.validation); longer values are rejected, not clipped.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000

# Characters MLflow accepts in param and metric keys.
_BAD_KEY_CHARS = re.compile(r"[^\w.\- /:]")


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; empty dicts stay as leaves so the key is visible."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def clean_key(key: str) -> str:
    """A key MLflow accepts: bad characters become `_`, clipped to MLflow's length limit."""
    return _BAD_KEY_CHARS.sub("_", key)[:MAX_KEY_LENGTH]


def to_text(value: Any, limit: int) -> str:
    """Stringify a value (lists as JSON), hide credentials (URI parts, secret environment
    values), clip to `limit` characters."""
    if type(value).__name__ == "SecretStr":  # pydantic secret: never reveal, whatever the key
        return MASK
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str, sort_keys=True)
    else:
        text = str(value)
    text = redact_text(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def safe_items(data: Mapping[str, Any], limit: int) -> dict[str, str]:
    """Flatten, mask secret-looking keys and clip values: what reaches MLflow."""
    out: dict[str, str] = {}
    for key, value in flatten(data).items():
        out[clean_key(key)] = MASK if is_secret_key(key) else to_text(value, limit)
    return out


def to_params(data: Mapping[str, Any]) -> dict[str, str]:
    """Params for MLflow: flat, masked, at most 6000 characters each."""
    return safe_items(data, MAX_PARAM_VALUE_LENGTH)


def to_tags(data: Mapping[str, Any]) -> dict[str, str]:
    """Tags for MLflow: flat, masked, at most 8000 characters each."""
    return safe_items(data, MAX_TAG_VALUE_LENGTH)
