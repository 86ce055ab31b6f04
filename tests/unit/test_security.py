"""Security (docs/security.md): stored artifacts are never unpickled, credentials never reach
MLflow, logs, job metadata or the journal, names never escape the gallery root, job
submission carries the Ray token. Every test plants the attack and checks it was refused."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import (
    ArchitectureConfig,
    ConfigError,
    ModelConfig,
    PreprocessConfig,
    load_config,
)
from pipeline.gallery.store import Gallery, GalleryError, embeddings_to_arrow
from pipeline.io import uri as uri_io
from pipeline.models.backbone import EmbeddingNet
from pipeline.models.store import (
    ModelLoadError,
    build_model,
    embedder_meta,
    load_trained,
    resolve_blob,
    restore_training_state,
    save_model_dir,
)
from pipeline.ops import jobs
from pipeline.ops.journal import JobIdError, Journal

ARCH = ArchitectureConfig(widths=[4, 8], embedding_dim=6, num_classes=3)
PRE = PreprocessConfig(input_size=8)

# Distinctive values: any of them found in an output is a leak.
CFG_SECRET = "cfgS3cretVALUE-7f3a91"
CFG_KEY_ID = "AKIACFGKEYID7F3A91"
ENV_SECRET = "envS3cretVALUE-b4e2c8"
ENV_TOKEN = "rayTokenVALUE-5d1e0f77"
URI_PASSWORD = "uriPassw0rd-31f0e2d"
SECRETS = (CFG_SECRET, CFG_KEY_ID, ENV_SECRET, ENV_TOKEN, URI_PASSWORD)


class _Plant:
    """A pickle that, once loaded, writes a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@contextmanager
def _must_not_run(marker: Path) -> Iterator[None]:
    """Checked even when the block raises something unexpected: did the planted code run?"""
    try:
        yield
    finally:
        assert not marker.exists(), f"the planted pickle ran: it wrote {marker}"


def _net() -> EmbeddingNet:
    torch.manual_seed(0)
    return EmbeddingNet(ARCH, in_channels=1).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def _tree_text(root: Path) -> str:
    """Every byte under `root` (databases included), decoded leniently, for grepping."""
    return "\n".join(
        p.read_bytes().decode("utf-8", errors="replace") for p in root.rglob("*") if p.is_file()
    )


# -- stored artifacts are loaded without unpickling ------------------------------------------
def test_weights_replaced_by_a_pickle_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    d = save_model_dir(
        _net(), embedder_meta(ModelConfig(name="m", architecture=ARCH)), tmp_path / "m"
    )
    (d / "weights.safetensors").write_bytes(pickle.dumps(_Plant(marker)))
    blob = resolve_blob(ModelConfig(name="m", uri=str(d)))
    with (
        _must_not_run(marker),
        pytest.raises(ModelLoadError, match=r"model 'm': not a safetensors file .*refused"),
    ):
        build_model(blob)
    with (
        _must_not_run(marker),
        pytest.raises(ModelLoadError, match=r"weights\.safetensors: not a safetensors file"),
    ):
        load_trained(d)


def test_pickled_registry_model_is_refused(tmp_path: Path) -> None:
    """An mlflow.pytorch-style model (a pickled nn.Module) in the registry is not loaded
    unless the config opts in with allow_pickle for that model."""
    from pipeline.tracking import Tracker

    marker = tmp_path / "pwned"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "t", str(tmp_path / "art"))
    d = tmp_path / "pickled"
    (d / "data").mkdir(parents=True)
    (d / "model.json").write_text("{}")  # not carryover's format
    torch.save(_Plant(marker), d / "data" / "model.pth")
    with tracker.run("upload") as run:
        tracker.register_model("evil-embedder", d, run.run_id, aliases=["candidate"])
    cfg = ModelConfig(name="evil", uri="models:/evil-embedder@candidate")
    with (
        _must_not_run(marker),
        pytest.raises(ModelLoadError, match="pickled torch model is refused unless"),
    ):
        resolve_blob(cfg, tracking_uri=uri)


def test_pickle_disguised_as_torchscript_is_refused(tmp_path: Path) -> None:
    """A real TorchScript archive whose data.pkl is swapped for a planted pickle: TorchScript's
    own unpickler resolves only its types, so loading fails and no code runs."""
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(_net(), _x()), buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as z:
        for name in src.namelist():
            planted = name.endswith(("data.pkl", "constants.pkl"))
            z.writestr(
                name, pickle.dumps(_Plant(marker), protocol=2) if planted else src.read(name)
            )
    cfg = ModelConfig(name="ts", uri=str(path), preprocess=PRE, architecture=ARCH)
    blob = resolve_blob(cfg)
    assert blob.kind == "torchscript"
    with (
        _must_not_run(marker),
        pytest.raises(ModelLoadError, match="model 'ts': not a loadable TorchScript archive"),
    ):
        build_model(blob)


def test_checkpoint_with_a_pickled_optimizer_is_refused(tmp_path: Path) -> None:
    """Ray Train resumes from `train.safetensors` + `optimizer.pt`: the optimizer state is
    read with weights_only=True, so a planted object in it is refused."""
    from safetensors.torch import save

    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(_x()).sum().backward()
    opt.step()
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "train.safetensors").write_bytes(save(net.state_dict()))
    torch.save(opt.state_dict(), d / "optimizer.pt")
    (d / "progress.json").write_text(json.dumps({"epoch": 4}))
    fresh = _net()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert restore_training_state(d, fresh, fresh_opt) == 5  # the honest checkpoint resumes
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]

    marker = tmp_path / "pwned"
    torch.save(_Plant(marker), d / "optimizer.pt")
    with (
        _must_not_run(marker),
        pytest.raises(ModelLoadError, match=r"optimizer\.pt: refused: not a plain optimizer"),
    ):
        restore_training_state(d, _net(), torch.optim.AdamW(_net().parameters()))


def test_shard_with_a_pickled_object_column_is_refused(tmp_path: Path) -> None:
    """Once Ray Data is imported, a Parquet column typed `ray.data.arrow_pickled_object`
    unpickles its values when read: a crafted gallery shard would run code."""
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectArray

    marker = tmp_path / "pwned"
    g = Gallery(str(tmp_path / "gallery"))
    emb = np.zeros((1, 4), np.float32)
    table = pa.table(
        {
            "key": ArrowPythonObjectArray.from_objects([_Plant(marker)]),
            "embedding": embeddings_to_arrow(emb),
            "source": pa.array(["embed:v1"]),
        }
    )
    Path(g.shard_uri("v1", 0)).parent.mkdir(parents=True)
    pq.write_table(table, g.shard_uri("v1", 0))
    g.commit_shard("v1", {"shard_id": 0, "path": "shard-00000.parquet", "rows": 1})
    g.finalize("v1", {"model": "v1", "embedding_dim": 4})
    with (
        _must_not_run(marker),
        pytest.raises(uri_io.UnsafeFileError, match="'key' has the Arrow extension type"),
    ):
        for batch in g.iter_embeddings("v1"):
            batch.column("key").to_pylist()  # what every consumer of a shard does
    with (
        _must_not_run(marker),
        pytest.raises(uri_io.UnsafeFileError, match="ray.data.arrow_pickled_object"),
    ):
        uri_io.read_table(g.shard_uri("v1", 0)).column("key").to_pylist()


# -- credentials never reach MLflow, logs, job metadata or the journal -----------------------
def _secret_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    monkeypatch.setenv("RAY_AUTH_TOKEN", ENV_TOKEN)
    return load_config(
        None,
        [
            f"workdir={tmp_path / 'wd'}",
            f"storage.access_key_id={CFG_KEY_ID}",
            f"storage.secret_access_key={CFG_SECRET}",
            *extra,
        ],
    )


def test_mlflow_params_tags_and_artifacts_hold_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an upgrade logs (config.yaml artifact, params, tags, a failed run's error, a
    registered model's tags), on a file-backed MLflow: no secret in any byte it wrote."""
    from pipeline.config import dump_config
    from pipeline.context import Context
    from pipeline.tracking import TrackingError

    cfg = _secret_config(
        tmp_path,
        monkeypatch,
        f"storage.endpoint_url=http://carry:{URI_PASSWORD}@127.0.0.1:9000",
        f"ray.submit_address=http://ops:{URI_PASSWORD}@head:8265",
    )
    ctx = Context(cfg, quiet=True)
    tracker = ctx.tracker
    with tracker.run("upgrade", ctx.tags(step="upgrade", endpoint=cfg.storage.endpoint_url)) as run:
        run.log_dict(dump_config(cfg), "config.yaml")  # as flows.run_upgrade does
        run.log_params({"storage": cfg.storage.model_dump(mode="json"), "ray": cfg.ray})
        run.set_tags({"carryover.env_echo": f"key={ENV_SECRET}"})
        d = save_model_dir(_net(), embedder_meta(cfg.new_model), tmp_path / "m")
        tracker.register_model("g-embedder", d, run.run_id, tags={"from": f"token {ENV_TOKEN}"})
    with pytest.raises(RuntimeError), tracker.run("failing"):
        raise RuntimeError(f"cannot reach http://u:{URI_PASSWORD}@x/ with {ENV_SECRET}")
    written = _tree_text(tmp_path / "wd")  # mlflow.db and mlartifacts/
    assert _leaks(written) == []
    art = next((tmp_path / "wd" / "mlartifacts").rglob("config.yaml")).read_text()
    assert "http://***:***@127.0.0.1:9000" in art and "secret_access_key: '***'" in art
    err = TrackingError(f"MLflow at http://u:{URI_PASSWORD}@h is unreachable")
    assert _leaks(str(err)) == [] and "http://***:***@h" in str(err)


def test_job_submission_metadata_bundle_and_journal_hold_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Submit through a stand-in job API (everything Ray would receive is captured, the
    uploaded working dir included), then grep it, the journal and the console."""
    cfg = _secret_config(tmp_path, monkeypatch, f"gallery={tmp_path / 'gallery'}")
    sent: dict = {}

    class _Client:
        def submit_job(self, **kw) -> str:
            sent.update(kw)
            sent["bundle"] = _tree_text(Path(kw["runtime_env"]["working_dir"]))
            return kw["submission_id"]

    monkeypatch.setattr(jobs, "connect", lambda address, token_file=None: _Client())
    sub = jobs.submit(
        cfg, "http://head:8265", args=["--report", "r.json"], env=["PYTHONHASHSEED=0"]
    )
    assert "secret_access_key: null" in sent["bundle"]
    record = json.dumps({k: v for k, v in sent.items() if k != "bundle"}, default=str)
    journal = _tree_text(tmp_path / "gallery" / "_jobs")
    assert sub.id in journal and "jobs/upgrade.py" in record
    assert _leaks(record) == [] and _leaks(sent["bundle"]) == [] and _leaks(journal) == []
    assert _leaks("".join(capsys.readouterr())) == []

    # A credential on the job's command line would be stored in its record: refused.
    with pytest.raises(ConfigError, match="'storage.secret_access_key' carries a credential"):
        jobs.entrypoint("upgrade", ["--set", f"storage.secret_access_key={CFG_SECRET}"])
    with pytest.raises(ConfigError, match="'--token' carries a credential"):
        jobs.entrypoint("upgrade", ["--token", ENV_TOKEN])
    # ... and so would a URI with user:password@ in the uploaded config.
    cred = _secret_config(tmp_path, monkeypatch, f"tracking.uri=http://u:{URI_PASSWORD}@m:5000")
    with pytest.raises(ConfigError, match="tracking.uri: the URI carries credentials") as e:
        jobs.job_config(cred)
    assert _leaks(str(e.value)) == []


def test_journal_log_is_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    j = Journal(str(tmp_path / "g"))
    j.put({"id": "local-g-1", "address": f"http://ops:{URI_PASSWORD}@head:8265", "env": ["A"]})
    j.write_log("local-g-1", f"boto said: bad key {ENV_SECRET}\nconnect s3://u:{URI_PASSWORD}@h\n")
    assert j.read_log("local-g-1") == "boto said: bad key ***\nconnect s3://***:***@h\n"
    assert j.get("local-g-1")["address"] == "http://***:***@head:8265"
    assert _leaks(_tree_text(tmp_path / "g")) == []


# -- names never escape the gallery root -----------------------------------------------------
# "a/b" first: uri_io.join already refuses ".." and "/abs"; a version is also one segment.
BAD_NAMES = ("a/b", "", "v\n1", "..", "../x", "a/../../b", "/etc/passwd", "v1\x00.json")


def test_uri_join_refuses_escapes_and_control_characters() -> None:
    for bad in ("..", "../x", "a/../../b", "/etc/passwd", "a\\..\\b"):
        with pytest.raises(ValueError, match="would escape"):
            uri_io.join("s3://bucket/gallery", bad)
    for bad in ("v1\x00.json", "a\nb", "x\x7f"):
        with pytest.raises(ValueError, match="not a plain name"):
            uri_io.join("/data/gallery", "versions", bad)


def test_gallery_version_and_shard_names_cannot_escape(tmp_path: Path) -> None:
    g = Gallery(str(tmp_path / "gallery"))
    for bad in BAD_NAMES:
        with pytest.raises(GalleryError, match="is not a plain name"):
            g.version_uri(bad)
        with pytest.raises(GalleryError, match="is not a plain name"):
            g.promote(bad)
    with pytest.raises(ValueError):  # shard ids are integers, formatted, never text
        g.shard_uri("v1", "../x")  # type: ignore[arg-type]
    g.finalize("v1", {"model": "v1"})
    (tmp_path / "gallery" / "versions" / "not a version").mkdir()
    assert g.versions() == ["v1"]  # a stray folder is no version
    assert not g.has_version("v1 (planned)")  # a label, not a version: no path is built


def test_tampered_manifest_and_current_are_refused(tmp_path: Path) -> None:
    """Someone with write access to the object store edits the manifest or CURRENT: the
    names in them become object keys, so they are checked when read."""
    g = Gallery(str(tmp_path / "gallery"))
    g.finalize("v1", {"model": "v1"})
    g.promote("v1")
    manifest = tmp_path / "gallery" / "versions" / "v1" / "manifest.json"
    m = json.loads(manifest.read_text())
    for field, value in (("shards", [{"shard_id": 0, "path": "../../../outside.parquet"}]),
                         ("model", "../../models/evil"), ("source_version", "/etc")):  # fmt: skip
        manifest.write_text(json.dumps({**m, field: value}))
        with pytest.raises(GalleryError, match="is not a plain name"):
            g.manifest("v1")
    current = tmp_path / "gallery" / "CURRENT"
    current.write_text(json.dumps({"version": "../../../etc", "history": []}))
    with pytest.raises(GalleryError, match=r"CURRENT: version '../../../etc' is not a plain"):
        g.current()


def test_model_gallery_and_adapter_names_cannot_escape(tmp_path: Path) -> None:
    from pipeline.context import Context
    from pipeline.services.search import load_adapter

    for key in ("gallery_name", "new_model.name", "plan.target_version", "side_info.name"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}=../x"])
    ctx = Context(load_config(None, [f"workdir={tmp_path}"]), quiet=True)
    with pytest.raises(ConfigError, match=r"--adapter '\.\./\.\./x': expected one of"):
        load_adapter(ctx, "../../x", "v1")


def test_registry_tag_naming_a_path_is_not_upgraded_to(tmp_path: Path) -> None:
    """The scheduler turns the candidate's `carryover.model` tag into a model and version
    name: a registry entry tagged "../x" is refused, not submitted."""
    from pipeline.context import Context
    from pipeline.ops.schedule import decide

    cfg = load_config(None, [f"workdir={tmp_path}", "gallery_name=sec"])
    ctx = Context(cfg, quiet=True)
    d = save_model_dir(_net(), embedder_meta(cfg.new_model), tmp_path / "m")
    for model, aliases in (("v1", ["serving"]), ("../../evil", ["candidate"])):
        with ctx.tracker.run(f"train-{len(aliases)}") as run:
            version = ctx.tracker.register_model(
                "sec-embedder", d, run.run_id, tags=ctx.tags(model=model), aliases=aliases
            )
        if model == "v1":
            ctx.gallery.finalize("v1", {"model": "v1", "registry_version": version})
            ctx.gallery.promote("v1")
    decision = decide(cfg)
    assert not decision.upgrade
    assert "carryover.model tag '../../evil' is not a plain name; refused" in decision.reason


def test_job_ids_cannot_escape_the_journal_or_the_job_api(tmp_path: Path) -> None:
    j = Journal(str(tmp_path / "g"))
    for bad in BAD_NAMES:
        with pytest.raises(JobIdError, match="is not a plain name"):
            j.get(bad)
        with pytest.raises(JobIdError):
            j.put({"id": bad})
        with pytest.raises(JobIdError):  # before any connection: no URL is built from it
            jobs.status(bad, "http://head:8265", journal=j)
        with pytest.raises(JobIdError):
            jobs.stop(bad, "http://head:8265")
    assert not list((tmp_path).rglob("*.json"))


def test_artifact_paths_cannot_escape_the_run(tmp_path: Path) -> None:
    from pipeline.tracking import Tracker, TrackingError

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "t", str(tmp_path / "art"))
    with tracker.run("r") as run:
        for bad in ("../../../escape.json", str(tmp_path / "abs.json")):
            with pytest.raises(TrackingError, match="Invalid artifact path"):
                run.log_dict({"a": 1}, bad)
    assert not list(tmp_path.rglob("escape.json")) and not (tmp_path / "abs.json").exists()


# -- job submission carries the Ray token ----------------------------------------------------
def test_submission_sends_the_ray_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import ray.job_submission

    seen: list = []

    class _Client:
        def __init__(self, address: str, headers: dict | None = None) -> None:
            seen.append(headers)

        def list_jobs(self) -> list:
            return []

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _Client)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", ENV_TOKEN)
    jobs.connect("http://head:8265")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    jobs.connect("http://head:8265")
    assert seen == [{"Authorization": f"Bearer {ENV_TOKEN}"}, None]


@pytest.mark.slow
def test_upgrade_run_logs_and_server_hold_no_secret(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    mlflow_server: str,
    ray_local: None,
) -> None:
    """A real (tiny) upgrade through its ingest stage on a real `mlflow server`, logging in
    with user:password@ in tracking.uri and with credentials in the config and environment:
    the console, the report and every run's params, tags and artifacts are grepped."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.data.prepare import prepare
    from pipeline.flows import print_summary, run_upgrade, write_report

    old = ModelConfig(name="v1", architecture=ARCH, preprocess=PRE)
    model_dir = save_model_dir(_net(), embedder_meta(old), tmp_path / "v1-model")
    server = mlflow_server.replace("http://", f"http://carry:{URI_PASSWORD}@")
    cfg = _secret_config(
        tmp_path,
        monkeypatch,
        "gallery_name=secrets",
        f"tracking.uri={server}",
        "tracking.experiment=security",
        f"old_model.uri={model_dir}",
        f"old_model.architecture={json.dumps(ARCH.model_dump())}",
        "old_model.preprocess.input_size=8",
        "side_info.enabled=false",
        "embed.batch_size=64",
    )
    prepare("digits", cfg.images_uri, 2, cfg.storage, cfg.data, limit=64)
    report = run_upgrade(cfg, quiet=True, until="ingest")
    from rich.console import Console

    print_summary(report, Console())
    write_report(report, tmp_path / "report.json")
    assert report.serving == "v1" and report.stopped_after == "ingest"
    console = "".join(capfd.readouterr())
    assert "MLflow parent run" in console and _leaks(console) == []
    assert _leaks((tmp_path / "report.json").read_text()) == []

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("security")
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.run_name for r in runs} >= {"upgrade", "old-model", "ingest"}
    records = json.dumps([[r.data.params, r.data.tags] for r in runs])
    for r in runs:
        mlflow.artifacts.download_artifacts(
            run_id=r.info.run_id, dst_path=str(tmp_path / "dl" / r.info.run_id),
            tracking_uri=mlflow_server,
        )  # fmt: skip
    artifacts = _tree_text(tmp_path / "dl")
    assert "config.yaml" in str(list((tmp_path / "dl").rglob("*")))
    assert _leaks(records) == [] and _leaks(artifacts) == []
