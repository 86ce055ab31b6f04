"""Jobs: submit a `jobs/` entrypoint to a Ray cluster (Job Submission API) or run it here on a
local Ray; list, follow, stop. Every job is also written to the gallery's journal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import BROUGHT_SECTIONS, ConfigError, UpgradeConfig
from pipeline.gallery.lock import TOKEN_ENV as LOCK_ENV
from pipeline.io.redact import is_secret_key, redact_text, uri_has_credentials
from pipeline.ops.journal import JOB_ID_ENV, Journal, check_job_id, new_id

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
AGENT_WAIT_S = 120.0  # how long a submission waits for a fresh head's job agent
LOCAL = "local"
LOG_FLUSH_S = 2.0  # a local job's log reaches the journal this often (`jobs logs -f` reads it)
# The runtime env keys carryover sets itself: the job's code is its bundle (working_dir), and
# these variables tie the job to its journal entry and its gallery lease.
OWN_RUNTIME_ENV = ("working_dir",)


class JobsError(RuntimeError):
    """A job could not be submitted, found or followed; the message says where and why."""

    def __init__(self, message: str) -> None:
        super().__init__(redact_text(message))  # Ray's errors may echo an address or a header


@dataclass
class Submission:
    """One submitted (or locally run) job."""

    id: str
    address: str
    job: str
    entrypoint: str
    env_names: list[str] = field(default_factory=list)
    status: str = "PENDING"


@dataclass
class JobOptions:
    """What `ray job submit` lets a submission ask for, passed through to Ray as given: a
    runtime env (merged with carryover's; see `submit_kwargs`) and the entrypoint's resources."""

    runtime_env: dict[str, Any] = field(default_factory=dict)
    num_cpus: float | None = None
    num_gpus: float | None = None
    memory: int | None = None
    resources: dict[str, float] | None = None

    def given(self) -> bool:
        return bool(self.runtime_env or self.resources) or any(
            v is not None for v in (self.num_cpus, self.num_gpus, self.memory)
        )


def load_runtime_env(path: str | Path | None, text: str | None) -> dict[str, Any]:
    """--runtime-env FILE (YAML or JSON) updated by --runtime-env-json TEXT, as a dict."""
    env: dict[str, Any] = {}
    if path is not None:
        p = Path(path).expanduser()
        try:
            env = yaml.safe_load(p.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"--runtime-env {p}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--runtime-env {p}: not YAML or JSON ({e})") from None
        if not isinstance(env, dict):
            raise ConfigError(f"--runtime-env {p}: expected a mapping, got {type(env).__name__}")
    if text is not None:
        env = {**env, **_json_object("--runtime-env-json", text)}
    return env


def parse_resources(text: str | None) -> dict[str, float] | None:
    """--entrypoint-resources: a JSON object of resource name to quantity."""
    if text is None:
        return None
    res = _json_object("--entrypoint-resources", text)
    bad = [k for k, v in res.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad:
        raise ConfigError(f"--entrypoint-resources: {bad[0]!r} needs a number")
    return {k: float(v) for k, v in res.items()}


def _json_object(option: str, text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{option}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{option}: expected a JSON object, got {type(obj).__name__}")
    return obj


def submit_kwargs(
    ep: str,
    sid: str,
    bundle: Path,
    env_vars: dict[str, str],
    metadata: dict[str, str],
    opts: JobOptions | None = None,
) -> dict[str, Any]:
    """JobSubmissionClient.submit_job's arguments. The user's runtime env passes through
    (pip, conda, py_modules, container, ...); its env_vars are merged under carryover's own
    (--env, the job id and the lease token win: the journal and the lock depend on them);
    a working_dir of its own is refused (the job's code is carryover's bundle)."""
    opts = opts or JobOptions()
    theirs = dict(opts.runtime_env)
    for key in OWN_RUNTIME_ENV:
        if key in theirs:
            raise ConfigError(
                f"runtime env {key!r}: carryover ships the job's code and config as its "
                "working_dir; add your own code with py_modules instead"
            )
    extra_env = theirs.pop("env_vars", None) or {}
    if not isinstance(extra_env, dict):
        raise ConfigError("runtime env 'env_vars': expected a mapping of names to strings")
    runtime_env = {
        **theirs,
        "working_dir": str(bundle),
        "env_vars": {**{k: str(v) for k, v in extra_env.items()}, **env_vars},
    }
    kw: dict[str, Any] = {
        "entrypoint": ep,
        "submission_id": sid,
        "runtime_env": runtime_env,
        "metadata": metadata,
        "entrypoint_num_cpus": opts.num_cpus,
        "entrypoint_num_gpus": opts.num_gpus,
        "entrypoint_memory": opts.memory,
        "entrypoint_resources": opts.resources,
    }
    return {k: v for k, v in kw.items() if v is not None}


def find_token(token_file: str | Path | None = None) -> str | None:
    """The Ray auth token: --token-file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get(TOKEN_ENV) and token_file is None:
        return os.environ[TOKEN_ENV].strip()
    for path in (token_file, os.environ.get(TOKEN_PATH_ENV), Path.home() / ".ray" / "auth_token"):
        if path is None:
            continue
        p = Path(path).expanduser()
        if p.is_file():
            return p.read_text().strip() or None
        if path is token_file:
            raise ConfigError(f"--token-file {p}: no such file")
    return None


def job_address(address: str | None, cfg: UpgradeConfig | None = None) -> str | None:
    """--address, else ray.submit_address, else RAY_API_SERVER_ADDRESS; None = run here."""
    return address or (cfg.ray.submit_address if cfg else None) or os.environ.get(ADDRESS_ENV)


def connect(address: str, token_file: str | Path | None = None) -> Any:
    """A JobSubmissionClient for `address`, with the bearer token if one is found."""
    # start-up: ray.job_submission costs ~0.7 s; the journal's commands (`jobs list`, a local
    # job's status) never connect.
    from ray.job_submission import JobSubmissionClient

    # Ray's SDK logs every package upload at INFO; our own lines say what matters.
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not address.startswith(("http://", "https://")):
        raise ConfigError(
            f"--address {address!r}: expected the Ray dashboard's job API, http://HEAD:8265"
        )
    token = find_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with _address_env_set_aside():
            client = JobSubmissionClient(address, headers=headers)
        client.list_jobs()  # the version probe does not check the token: this does
    except Exception as e:
        raise JobsError(_explain(address, e, token is not None)) from None
    return client


@contextlib.contextmanager
def _address_env_set_aside() -> Iterator[None]:
    """Ray's SDK lets RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, override the address it is
    given; a shell that exported RAY_ADDRESS for `ray.init` would send `--address` elsewhere.
    `job_address` has already weighed the environment, so the address given here wins."""
    saved = {k: os.environ.pop(k) for k in (ADDRESS_ENV, "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _explain(address: str, e: Exception, had_token: bool) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "Unauthorized" in str(e) or "Missing authentication token" in str(e):
        return (
            f"Ray at {address} requires a token and none was found: set RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or --token-file (`ray get-auth-token` on the head prints it)"
        )
    if "Forbidden" in str(e) or "Invalid authentication token" in str(e):
        return f"Ray at {address} refused the token: it is not this cluster's token"
    if "Failed to connect" in str(e) or isinstance(e, ConnectionError):
        return (
            f"cannot reach Ray's job API at {address}: is the head up (`ray start --head "
            "--dashboard-host 0.0.0.0`) and the port (8265) open?"
        )
    return f"Ray job API at {address}: {text}"


# -- what travels with a job ---------------------------------------------------------------
def _local_abs(value: str | None) -> str | None:
    if value is None or "://" in value or value.startswith("models:/"):
        return value
    return str(Path(value).expanduser().resolve())


def job_config(cfg: UpgradeConfig) -> dict[str, Any]:
    """The config a job runs with: local paths made absolute (the job's working directory is
    a temporary copy), and no credentials (the cluster's own environment provides them)."""
    data = cfg.model_dump(mode="json")
    data["storage"]["access_key_id"] = data["storage"]["secret_access_key"] = None
    _refuse_uri_credentials(data)
    data["workdir"] = _local_abs(data["workdir"])
    for key in ("gallery", "images"):
        data[key] = _local_abs(data[key])
    data["tracking"]["artifact_location"] = _local_abs(data["tracking"]["artifact_location"])
    data["evaluate"]["report_dir"] = _local_abs(data["evaluate"]["report_dir"])
    uri = data["tracking"]["uri"]
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        data["tracking"]["uri"] = "sqlite:///" + _local_abs(uri[len("sqlite:///") :])
    for m in BROUGHT_SECTIONS:
        data[m]["uri"] = _local_abs(data[m]["uri"])
        if data[m]["uri"]:
            # reloaded, the dump's every key counts as given: a brought model's training
            # keys would be refused and its default embedding_dim would contradict an ONNX graph
            del data[m]["train"]
            arch = getattr(cfg, m).architecture
            data[m]["architecture"] = arch.model_dump(mode="json", exclude_unset=True)
    return data


def _refuse_uri_credentials(data: dict[str, Any], prefix: str = "") -> None:
    """The job's config.yaml is uploaded to the cluster (readable there): no user:password@."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _refuse_uri_credentials(value, f"{name}.")
        elif isinstance(value, str) and uri_has_credentials(value):
            raise ConfigError(
                f"{name}: the URI carries credentials, and a job's config travels to the cluster; "
                "give them through the cluster's environment instead (MLFLOW_TRACKING_USERNAME/"
                "MLFLOW_TRACKING_PASSWORD, AWS_* variables, or --env NAME)"
            )


def jobs_dir() -> Path:
    d = Path(__file__).resolve().parents[2] / "jobs"
    if not d.is_dir():
        raise JobsError(f"no jobs/ folder beside the pipeline package ({d}): use a source checkout")
    return d


def make_bundle(cfg: UpgradeConfig, job: str, dst: Path) -> Path:
    """The job's working directory: the pipeline package, jobs/ and config.yaml (small: the
    cluster brings the dependencies; only our code and the config travel)."""
    src = jobs_dir()
    if not (src / f"{job}.py").is_file():
        choices = sorted(p.stem for p in src.glob("*.py"))
        raise ConfigError(f"--job {job!r}: no jobs/{job}.py; choose one of {choices}")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(src.parent / "pipeline", dst / "pipeline", ignore=ignore)
    shutil.copytree(src, dst / "jobs", ignore=ignore)
    (dst / "config.yaml").write_text(yaml.safe_dump(job_config(cfg), sort_keys=False))
    return dst


def _env(env: list[str] | None, lock_token: str | None, job_id: str) -> dict[str, str]:
    """KEY=VALUE pairs, or KEY to forward this shell's value (never printed)."""
    out = {"PYTHONUNBUFFERED": "1", JOB_ID_ENV: job_id}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not key.isidentifier():  # the value is not echoed: it may be a secret
            raise ConfigError(f"--env {key!r}=...: expected KEY=VALUE or KEY")
        if not sep:
            if key not in os.environ:
                raise ConfigError(f"--env {key}: not set in this environment")
            value = os.environ[key]
        out[key] = value
    if lock_token:
        out[LOCK_ENV] = lock_token
    return out


def _names_secret(name: str) -> bool:
    n = name.lower().rstrip("-_")
    return is_secret_key(n) and not n.endswith(("file", "path"))  # --token-file names a file


def entrypoint(job: str, args: list[str], python: str = "python") -> str:
    """The job's command line. Ray keeps it in the job's record, the journal keeps it too, so
    an argument that carries a credential (`--set storage.secret_access_key=...`) is refused."""
    for arg in args:
        names = arg.split("=")[:-1] if "=" in arg else [arg] if arg.startswith("-") else []
        secret = [n for n in names if _names_secret(n)]
        if secret or uri_has_credentials(arg):
            what = secret[0] if secret else "<URI>"
            raise ConfigError(
                f"job argument {what!r} carries a credential, and a job's command line is "
                "stored in its record: pass it with --env NAME (the value is not recorded) or "
                "through the cluster's environment"
            )
    return " ".join([python, f"jobs/{job}.py", "--config", "config.yaml", *map(shlex.quote, args)])


def submit(
    cfg: UpgradeConfig,
    address: str,
    job: str = "upgrade",
    args: list[str] | None = None,
    env: list[str] | None = None,
    token_file: str | Path | None = None,
    trigger: str = "manual",
    lock_token: str | None = None,
    options: JobOptions | None = None,
) -> Submission:
    """Submit `jobs/<job>.py` with the config to the cluster at `address`; journal it."""
    client = connect(address, token_file)
    sid = new_id("carryover", cfg.gallery_name)
    env_vars = _env(env, lock_token, sid)
    ep = entrypoint(job, args or [])
    metadata = {
        "carryover.job": job,
        "carryover.gallery": cfg.gallery_name,
        "carryover.gallery_uri": redact_text(cfg.gallery_uri),
        "carryover.target": cfg.target_version,
        "carryover.trigger": trigger,
    }
    with tempfile.TemporaryDirectory(prefix="carryover-job-") as tmp:
        bundle = make_bundle(cfg, job, Path(tmp))
        kwargs = submit_kwargs(ep, sid, bundle, env_vars, metadata, options)
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                client.submit_job(**kwargs)
                break
            except Exception as e:
                # A head that just started (or is busy) answers 500 "No available agent"
                # until its job agent is up: that one is worth waiting for.
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise JobsError(_explain(address, e, True)) from None
                time.sleep(2.0)
    sub = Submission(sid, address, job, ep, sorted(env_vars))
    _journal(cfg).put(_entry(cfg, sub, trigger))
    return sub


def _journal(cfg: UpgradeConfig) -> Journal:
    return Journal(cfg.gallery_uri, cfg.storage)


def _entry(cfg: UpgradeConfig, sub: Submission, trigger: str) -> dict[str, Any]:
    return {
        "id": sub.id,
        "kind": "job",
        "job": sub.job,
        "trigger": trigger,
        "address": sub.address,
        "gallery": cfg.gallery_name,
        "target": cfg.target_version,
        "entrypoint": sub.entrypoint,
        "env": sub.env_names,
        "status": sub.status,
        "created_at": time.time(),
    }


def run_here(
    cfg: UpgradeConfig,
    job: str = "upgrade",
    args: list[str] | None = None,
    env: list[str] | None = None,
    trigger: str = "manual",
    lock_token: str | None = None,
    echo: Callable[[str], None] = lambda line: print(line, end=""),
) -> Submission:
    """Run the job in the foreground on a local Ray (no --address), journalled like the rest."""
    sid = new_id(LOCAL, cfg.gallery_name)
    journal = _journal(cfg)
    with tempfile.TemporaryDirectory(prefix="carryover-job-") as tmp:
        bundle = make_bundle(cfg, job, Path(tmp))
        ep = entrypoint(job, args or [], sys.executable)
        env_vars = _env(env, lock_token, sid)
        sub = Submission(sid, LOCAL, job, ep, sorted(env_vars), "RUNNING")
        entry = _entry(cfg, sub, trigger)
        journal.put({**entry, "host": socket.gethostname(), "pid": os.getpid()})
        proc = subprocess.Popen(
            ep,
            shell=True,
            cwd=bundle,
            env={**os.environ, **env_vars, "PYTHONPATH": str(bundle)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        lines = _relay(proc.stdout, echo, lambda text: journal.write_log(sid, text))
        rc = proc.wait()
    sub.status = "SUCCEEDED" if rc == 0 else "FAILED"
    journal.write_log(sid, "".join(lines))
    journal.update(sid, status=sub.status, exit_code=rc, ended_at=time.time())
    return sub


def _relay(stream: Any, echo: Callable[[str], None], save: Callable[[str], Any]) -> list[str]:
    """Echo each line and save the whole output every LOG_FLUSH_S (for `jobs logs -f`)."""
    lines: list[str] = []
    saved_at = time.monotonic()
    for line in stream:
        lines.append(line)
        echo(line)
        if time.monotonic() - saved_at > LOG_FLUSH_S:
            save("".join(lines))
            saved_at = time.monotonic()
    return lines


# -- inspecting jobs -------------------------------------------------------------------------
def _info_dict(info: Any) -> dict[str, Any]:
    md = info.metadata or {}
    return {
        "id": info.submission_id,
        "kind": "job",
        "status": str(getattr(info.status, "value", info.status)),
        "job": md.get("carryover.job"),
        "gallery": md.get("carryover.gallery"),
        "target": md.get("carryover.target"),
        "trigger": md.get("carryover.trigger"),
        "entrypoint": info.entrypoint,
        "message": info.message,
        "created_at": (info.start_time or 0) / 1000,
        "ended_at": (info.end_time or 0) / 1000 or None,
    }


def list_jobs(
    address: str | None, token_file: str | Path | None = None, journal: Journal | None = None
) -> list[dict[str, Any]]:
    """Jobs on the cluster (carryover's), merged with the journal's jobs and ticks; newest
    first. A journalled job the cluster still knows takes the cluster's live status."""
    live: dict[str, dict[str, Any]] = {}
    if address:
        client = connect(address, token_file)
        for info in client.list_jobs():
            if info.submission_id and (info.metadata or {}).get("carryover.job"):
                live[info.submission_id] = _info_dict(info)
    rows = dict(live)
    for e in journal.entries(limit=200) if journal else []:
        rows[e["id"]] = {**e, **live.get(e["id"], {})}
    return sorted(rows.values(), key=lambda r: r.get("created_at") or 0, reverse=True)


def status(
    job_id: str, address: str | None, token_file=None, journal: Journal | None = None
) -> dict[str, Any]:
    """One job's record: from the cluster when it has an address, else from the journal."""
    check_job_id(job_id)  # it becomes a path in the journal and a URL path in the job API
    if address and not job_id.startswith(f"{LOCAL}-"):
        client = connect(address, token_file)
        try:
            return _info_dict(client.get_job_info(job_id))
        except Exception as e:
            if journal is None or journal.get(job_id) is None:
                raise JobsError(f"job {job_id!r} not found at {address}: {e}") from None
    entry = journal.get(job_id) if journal else None
    if entry is None:
        where = "the journal" if journal else "anywhere (give --address or --config)"
        raise JobsError(f"job {job_id!r} not found in {where}")
    return entry


def wait(
    job_id: str,
    address: str | None,
    token_file=None,
    journal: Journal | None = None,
    poll: float = 2.0,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Poll until the job is terminal (or `timeout` seconds pass)."""
    t0 = time.time()
    while True:
        rec = status(job_id, address, token_file, journal)
        if rec["status"] in TERMINAL:
            if journal is not None and address and journal.get(job_id) is not None:
                journal.update(job_id, status=rec["status"], ended_at=rec.get("ended_at"))
            return rec
        if timeout is not None and time.time() - t0 > timeout:
            return rec
        time.sleep(poll)


def logs(job_id: str, address: str | None, token_file=None, journal: Journal | None = None) -> str:
    check_job_id(job_id)
    if address and not job_id.startswith(f"{LOCAL}-"):
        try:
            return connect(address, token_file).get_job_logs(job_id)
        except JobsError:
            raise
        except Exception as e:
            raise JobsError(f"logs of {job_id!r} at {address}: {e}") from None
    text = journal.read_log(job_id) if journal else None
    if text is None:
        raise JobsError(f"no logs for {job_id!r} (local jobs keep them in the gallery's journal)")
    return text


def follow(job_id: str, address: str, token_file=None, echo=print) -> dict[str, Any]:
    """Stream the job's logs until it ends; returns its final record."""
    check_job_id(job_id)
    client = connect(address, token_file)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            echo(chunk)

    asyncio.run(tail())
    return wait(job_id, address, token_file)


def follow_local(
    job_id: str, journal: Journal, echo: Callable[[str], None] = print, poll: float = 1.0
) -> dict[str, Any]:
    """Stream a local job's log from the journal as it grows until the job ends; returns its
    final record. A job whose process is gone from this host without a final status ends as
    FAILED (it was killed)."""
    shown = 0
    while True:
        entry = journal.get(job_id)
        if entry is None:
            raise JobsError(f"job {job_id!r} not found in the journal")
        text = journal.read_log(job_id) or ""
        if len(text) > shown:
            echo(text[shown:])
            shown = len(text)
        if entry.get("status") in TERMINAL:
            return entry
        if _gone(entry):
            final = journal.get(job_id) or entry  # it may have ended between the two reads
            if final.get("status") in TERMINAL:
                echo((journal.read_log(job_id) or "")[shown:])
                return final
            return {**entry, "status": "FAILED", "message": "its process is gone"}
        time.sleep(poll)


def _gone(entry: dict[str, Any]) -> bool:
    """The local job's process is known to be gone (same host, no such pid)."""
    pid, host = entry.get("pid"), entry.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def stop(job_id: str, address: str, token_file=None) -> bool:
    check_job_id(job_id)
    try:
        return bool(connect(address, token_file).stop_job(job_id))
    except JobsError:
        raise
    except Exception as e:
        raise JobsError(f"stop {job_id!r} at {address}: {e}") from None
