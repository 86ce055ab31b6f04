"""Tracking: the only package that imports mlflow; runs, model registry, aliases and lineage."""

from pipeline.tracking.mlflow_store import (
    ModelVersionInfo,
    Registry,
    RunHandle,
    Tracker,
    TrackingError,
    attach_run,
    download_model,
    parse_model_uri,
    ui_hint,
)
from pipeline.tracking.params import flatten, is_secret_key, to_params, to_tags

__all__ = [
    "ModelVersionInfo",
    "Registry",
    "RunHandle",
    "Tracker",
    "TrackingError",
    "attach_run",
    "download_model",
    "flatten",
    "is_secret_key",
    "parse_model_uri",
    "to_params",
    "to_tags",
    "ui_hint",
]
