"""MLflow behind a small typed API: experiments, explicit-id runs, model registry, aliases."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities import LoggedModelInput, Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from pipeline.io.redact import redact, redact_text, uri_has_credentials
from pipeline.tracking.mlmodel import DatasetRef, dataset_input, log_logged_model
from pipeline.tracking.params import MAX_TAG_VALUE_LENGTH, to_params, to_tags, to_text

# MLflow's own tqdm bar for artifact downloads would land between carryover's progress lines
# (and on the terminal of a --json command): carryover reports its stages itself.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own key: the UI nests runs by it
ERROR_TAG = "carryover.error"
MODEL_ARTIFACT_PATH = "model"
MODEL_FILE = "model.json"
MODEL_ID_TAG = "carryover.model_id"  # on a model version: its LoggedModel
# A server that refuses fails at once; one that answers slowly (a loaded host) gets time.
PROBE_TIMEOUT_S = 30.0
# The runs open in this thread of control, innermost last: a run started while another is
# open nests under it, so a step run inside a stage's run needs no parent passed by hand.
_OPEN_RUNS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "carryover_open_runs", default=()
)
# A new SQLite store logs its table creation at INFO on stderr, between a command's own lines.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


class TrackingError(RuntimeError):
    """MLflow could not do what was asked; the message names the URI or entity involved."""

    def __init__(self, message: str) -> None:
        # Messages name the tracking URI, which may carry user:password@: never show that.
        super().__init__(redact_text(message))


@dataclass
class ModelVersionInfo:
    """One registered model version, as plain values."""

    name: str
    version: int
    run_id: str | None
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    model_id: str | None = None  # its MLflow 3 LoggedModel (None: registered before them)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _version_info(mv: ModelVersion) -> ModelVersionInfo:
    tags = dict(mv.tags or {})
    # A SQLite registry does not keep ModelVersion.model_id: a tag carries it there.
    model_id = tags.pop(MODEL_ID_TAG, None)
    return ModelVersionInfo(
        name=mv.name,
        version=int(mv.version),
        run_id=mv.run_id or None,
        source=mv.source,
        tags=tags,
        aliases=sorted(mv.aliases or []),
        model_id=getattr(mv, "model_id", None) or model_id,
    )


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    """Re-raise MLflow's exceptions as TrackingError saying what we were doing."""
    try:
        yield
    except MlflowException as e:
        raise TrackingError(f"{what}: {e.message}") from e


def _is_not_found(e: MlflowException) -> bool:
    # A missing alias comes back as INVALID_PARAMETER_VALUE "... alias X not found".
    return e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or (
        e.error_code == "INVALID_PARAMETER_VALUE" and "not found" in e.message
    )


def _is_http(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def _probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast if an HTTP tracking server does not answer (MLflow itself retries for minutes)."""
    parts = urllib.parse.urlsplit(uri)
    # /health needs no login, and urllib would take user:password@ for part of the host name.
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    try:
        with urllib.request.urlopen(f"{bare.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered (maybe 401/404 behind a proxy): reachable is all we check here
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it "
            "(`mlflow server ...`) or point tracking.uri elsewhere"
        ) from e


def _prepare_local_store(uri: str) -> None:
    # SQLite creates the file but not its directory.
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)


def _artifact_root(tracking_uri: str, artifact_location: str | None) -> str | None:
    """Where a new experiment stores artifacts; None lets the store (or server) decide."""
    if not artifact_location:
        return None
    scheme = urllib.parse.urlparse(artifact_location).scheme
    if scheme in ("", "file"):
        if _is_http(tracking_uri):
            return None  # a local path means nothing to a remote server: it proxies artifacts
        if scheme == "":
            return Path(artifact_location).expanduser().resolve().as_uri()
    return artifact_location


def _client(tracking_uri: str) -> MlflowClient:
    if _is_http(tracking_uri):
        _probe(tracking_uri)
        if uri_has_credentials(tracking_uri):
            # MLflow prints "View run ... at: <tracking URI>/#/..." on every run's end: with
            # user:password@ in the URI that line would put the password in every job log.
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    else:
        _prepare_local_store(tracking_uri)
    # The registry URI is given explicitly: MLflow's default may differ from the tracking URI.
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


class RunHandle:
    """Log to one run by its id (no global active-run stack, so threads cannot mix runs up)."""

    def __init__(self, client: MlflowClient, run_id: str, tracking_uri: str) -> None:
        self._client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri

    def __reduce__(self) -> tuple[Any, ...]:
        # MlflowClient holds a DB engine / HTTP session: rebuild it where the handle lands.
        return (attach_run, (self.tracking_uri, self.run_id))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested dicts become dotted keys; secret-looking keys are logged as ***."""
        items = [Param(k, v) for k, v in to_params(params).items()]
        with _errors(f"log params to run {self.run_id}"):
            self._client.log_batch(self.run_id, params=items)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        with _errors(f"log metrics to run {self.run_id}"):
            self._client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, v) for k, v in to_tags(tags).items()]
        with _errors(f"set tags on run {self.run_id}"):
            self._client.log_batch(self.run_id, tags=items)

    def log_dict(self, obj: dict[str, Any] | list[Any], artifact_file: str) -> None:
        """JSON or YAML by the file's extension; secret-named keys and credentials masked."""
        with _errors(f"log {artifact_file} to run {self.run_id}"):
            self._client.log_dict(self.run_id, redact(obj), artifact_file)

    def log_inputs(
        self, datasets: Iterable[DatasetRef] = (), model_ids: Iterable[str] = ()
    ) -> None:
        """The datasets and LoggedModels this run read: MLflow's UI links them from the run."""
        ds = [dataset_input(d) for d in datasets]
        ms = [LoggedModelInput(m) for m in dict.fromkeys(model_ids) if m]
        if not ds and not ms:
            return
        with _errors(f"log inputs to run {self.run_id}"):
            self._client.log_inputs(self.run_id, datasets=ds or None, models=ms or None)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a directory's contents, under `artifact_path`."""
        path = Path(local_path)
        with _errors(f"log artifact {path} to run {self.run_id}"):
            if path.is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure saved as an image artifact (format from the extension)."""
        with _errors(f"log figure {artifact_file} to run {self.run_id}"):
            self._client.log_figure(self.run_id, figure, artifact_file)


def attach_run(tracking_uri: str, run_id: str) -> RunHandle:
    """A handle on an existing run (e.g. inside a Ray worker); it does not end the run."""
    return RunHandle(_client(tracking_uri), run_id, tracking_uri)


def _run_dict(run: Any) -> dict[str, Any]:
    tags = dict(run.data.tags)
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
        "parent": tags.get(PARENT_RUN_TAG),
        "tags": tags,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "artifact_uri": run.info.artifact_uri,
    }


def parse_model_uri(uri: str) -> tuple[str, str | None, int | None]:
    """`models:/NAME@ALIAS` -> (NAME, ALIAS, None); `models:/NAME/VERSION` -> (NAME, None, V)."""
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?", uri.strip())
    if not m:
        raise TrackingError(
            f"model URI {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    name, alias, version = m.groups()
    return name, alias, int(version) if version else None


def _model_root(path: Path) -> Path:
    """The directory holding model.json (shallowest), else the download root."""
    if (path / MODEL_FILE).is_file():
        return path
    found = sorted(path.rglob(MODEL_FILE), key=lambda p: len(p.parts))
    return found[0].parent if found else path


class Registry:
    """Registered models, versions and aliases on one tracking URI (no experiment needed)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._client = _client(tracking_uri)

    def register_model(
        self,
        name: str,
        model_dir: str | Path,
        run_id: str,
        tags: Mapping[str, Any] | None = None,
        aliases: Iterable[str] = (),
    ) -> int:
        """Log `model_dir` as an MLflow model (pyfunc from code + signature, the dir's
        safetensors as its artifacts), a LoggedModel output of the run; register it."""
        src = Path(model_dir)
        if not (src / MODEL_FILE).is_file():
            raise TrackingError(f"register {name}: {src} has no {MODEL_FILE}")
        with _errors(f"register model {name} from run {run_id} at {self.tracking_uri}"):
            model_id, where = log_logged_model(self._client, run_id, name, src, dict(tags or {}))
            self._ensure_registered_model(name)
            # The concrete artifact URI (not models:/<id>, which MLflow would resolve through
            # the process-wide tracking URI); a server accepts it inside the model's artifacts.
            mv = self._client.create_model_version(
                name,
                where,
                run_id=run_id,
                tags={**to_tags(tags or {}), MODEL_ID_TAG: model_id},
                model_id=model_id,
            )
            version = int(mv.version)
            # what mlflow.register_model records: the model's page links its versions
            link = json.dumps([{"name": name, "version": str(version)}])
            self._client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: link})
            for alias in aliases:
                self._client.set_registered_model_alias(name, alias, str(version))
            self._client.set_tag(run_id, f"carryover.registered.{name}", str(version))
        return version

    def _ensure_registered_model(self, name: str) -> None:
        try:
            self._client.get_registered_model(name)
        except MlflowException as e:
            if not _is_not_found(e):
                raise
            try:
                self._client.create_registered_model(name)
            except MlflowException as e2:  # another job created it in between: fine
                if e2.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise

    def set_alias(self, name: str, alias: str, version: int) -> None:
        with _errors(f"set alias {name}@{alias} -> {version} at {self.tracking_uri}"):
            self._client.set_registered_model_alias(name, alias, str(version))

    def delete_alias(self, name: str, alias: str) -> None:
        with _errors(f"delete alias {name}@{alias} at {self.tracking_uri}"):
            self._client.delete_registered_model_alias(name, alias)

    def get_alias(self, name: str, alias: str) -> ModelVersionInfo | None:
        """The version `alias` points at, or None if the model or alias does not exist."""
        try:
            return _version_info(self._client.get_model_version_by_alias(name, alias))
        except MlflowException as e:
            if _is_not_found(e):
                return None
            raise TrackingError(f"get alias {name}@{alias}: {e.message}") from e

    def model_version(self, name: str, version: int) -> ModelVersionInfo | None:
        try:
            return _version_info(self._client.get_model_version(name, str(version)))
        except MlflowException as e:
            if _is_not_found(e):
                return None
            raise TrackingError(f"get model version {name}/{version}: {e.message}") from e

    def latest_versions(self, name: str, limit: int = 10) -> list[ModelVersionInfo]:
        """Up to `limit` versions of `name`, newest first (empty if the model does not exist)."""
        if "'" in name:
            raise TrackingError(f"model name {name!r} must not contain quotes")
        with _errors(f"list versions of {name} at {self.tracking_uri}"):
            found = self._client.search_model_versions(
                f"name = '{name}'", max_results=limit, order_by=["version_number DESC"]
            )
            if not found:
                return []
            # Search results leave aliases empty; the registered model has them.
            aliases = self._client.get_registered_model(name).aliases
        infos = [_version_info(mv) for mv in found]
        for info in infos:
            info.aliases = sorted(a for a, v in aliases.items() if int(v) == info.version)
        return infos

    def resolve(self, model_uri: str) -> ModelVersionInfo:
        """The version a `models:/` URI names; TrackingError naming the URI if there is none."""
        name, alias, version = parse_model_uri(model_uri)
        info = self.get_alias(name, alias) if alias else self.model_version(name, version or 0)
        if info is None:
            raise TrackingError(
                f"{model_uri}: no such registered model version at {self.tracking_uri}"
            )
        return info

    def download_model(self, model_uri: str, dst_dir: str | Path) -> str:
        """Download a `models:/` URI's files; returns the directory holding model.json."""
        info = self.resolve(model_uri)
        with _errors(f"download {model_uri} from {self.tracking_uri}"):
            src = self._client.get_model_version_download_uri(info.name, str(info.version))
            local = download_artifacts(
                artifact_uri=src, dst_path=str(dst_dir), tracking_uri=self.tracking_uri
            )
        return str(_model_root(Path(local)))


class Tracker(Registry):
    """Runs in one experiment (created if missing) plus the model registry."""

    def __init__(
        self, tracking_uri: str, experiment: str, artifact_location: str | None = None
    ) -> None:
        super().__init__(tracking_uri)
        self.experiment_name = experiment
        self._artifact_location = artifact_location
        with _errors(f"set up experiment {experiment!r} at {tracking_uri}"):
            self.experiment_id = self._ensure_experiment(experiment, artifact_location)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Tracker, (self.tracking_uri, self.experiment_name, self._artifact_location))

    def _ensure_experiment(self, name: str, artifact_location: str | None) -> str:
        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            root = _artifact_root(self.tracking_uri, artifact_location)
            try:
                return self._client.create_experiment(name, artifact_location=root)
            except MlflowException:
                exp = self._client.get_experiment_by_name(name)  # created concurrently?
                if exp is None:
                    raise
        if exp.lifecycle_stage != "active":
            raise TrackingError(
                f"experiment {name!r} at {self.tracking_uri} is deleted: restore it "
                "(`mlflow experiments restore`) or choose another tracking.experiment"
            )
        return exp.experiment_id

    @contextlib.contextmanager
    def run(
        self,
        name: str,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> Iterator[RunHandle]:
        """A run that ends FINISHED, or FAILED (KILLED on Ctrl-C) if the block raises.

        It nests under `parent_run_id`, or else under the innermost run still open here
        (the stage run the graph engine opened around the step that starts this one)."""
        all_tags = to_tags(tags or {})
        open_runs = _OPEN_RUNS.get()
        parent = parent_run_id or (open_runs[-1] if open_runs else None)
        if parent:
            all_tags[PARENT_RUN_TAG] = parent
        with _errors(f"start run {name!r} at {self.tracking_uri}"):
            created = self._client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        handle = RunHandle(self._client, created.info.run_id, self.tracking_uri)
        token = _OPEN_RUNS.set((*open_runs, handle.run_id))
        try:
            yield handle
        except BaseException as e:
            self._end_failed(handle.run_id, e)
            raise
        finally:
            _OPEN_RUNS.reset(token)
        with _errors(f"end run {handle.run_id}"):
            self._client.set_terminated(handle.run_id, "FINISHED")

    def _end_failed(self, run_id: str, error: BaseException) -> None:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        if _is_http(self.tracking_uri):
            try:
                _probe(self.tracking_uri)
            except TrackingError:
                # The server is gone: each call below would retry for minutes (MLflow's
                # MLFLOW_HTTP_REQUEST_MAX_RETRIES) only to fail. The run stays RUNNING.
                return
        # Best effort: never let a tracking hiccup hide the error that ended the run.
        with contextlib.suppress(Exception):
            message = to_text(f"{type(error).__name__}: {error}", MAX_TAG_VALUE_LENGTH)
            self._client.set_tag(run_id, ERROR_TAG, message)
        with contextlib.suppress(Exception):
            self._client.set_terminated(run_id, status)

    def search_runs(
        self,
        filter_string: str = "",
        max_results: int = 1000,
        order_by: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Runs of this experiment as plain dicts (run_id, name, status, parent, tags, ...)."""
        runs: list[dict[str, Any]] = []
        token: str | None = None
        with _errors(f"search runs {filter_string!r} at {self.tracking_uri}"):
            while len(runs) < max_results:
                page = self._client.search_runs(
                    [self.experiment_id],
                    filter_string=filter_string,
                    max_results=min(max_results - len(runs), 1000),
                    order_by=order_by or ["attributes.start_time DESC"],
                    page_token=token,
                )
                runs.extend(_run_dict(r) for r in page)
                token = page.token
                if not token:
                    break
        return runs

    def get_run(self, run_id: str) -> dict[str, Any]:
        with _errors(f"get run {run_id} at {self.tracking_uri}"):
            return _run_dict(self._client.get_run(run_id))

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        """Artifact paths directly under `path` of a run (files and folders)."""
        with _errors(f"list artifacts of run {run_id} at {self.tracking_uri}"):
            return [f.path for f in self._client.list_artifacts(run_id, path)]


def download_model(tracking_uri: str | None, model_uri: str, dst_dir: str | Path) -> str:
    """Download `models:/NAME@ALIAS` or `models:/NAME/VERSION`; returns the model.json dir."""
    if not tracking_uri:
        raise TrackingError(f"{model_uri}: a models:/ URI needs a tracking URI (tracking.uri)")
    return Registry(tracking_uri).download_model(model_uri, dst_dir)


def ui_hint(tracking_uri: str) -> str:
    """How to look at the runs and models in the MLflow UI (credentials in the URI masked)."""
    tracking_uri = redact_text(tracking_uri)
    if _is_http(tracking_uri):
        return f"MLflow UI: open {tracking_uri}"
    return (
        f"MLflow UI: run `mlflow ui --backend-store-uri {tracking_uri}`, "
        "then open http://127.0.0.1:5000"
    )
