"""infra/: manifests parse, required fields hold real values, and names refer to each other."""

from __future__ import annotations

import configparser
import re
import shlex
import subprocess
from collections import Counter
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from croniter import croniter

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
SYSTEMD = INFRA / "systemd"
NAMESPACE = "carryover"
IMAGE = "ghcr.io/example/carryover"
SECRETS_FILE = "secrets.example.yaml"
PLACEHOLDER = "REPLACE_ME"
CONFIG_PATH = "/etc/carryover/upgrade.yaml"
LOCKED_EXIT = 3  # `carryover schedule --once`: another upgrade holds the gallery lock
# Environment variables that carry credentials: never an inline `value:` in a manifest.
SECRET_ENV = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "RAY_AUTH_TOKEN",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
}
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
EXPECTED_FILES = {
    "k8s/namespace.yaml",
    "k8s/secrets.example.yaml",
    "k8s/configmap-upgrade.yaml",
    "k8s/mlflow.yaml",
    "k8s/raycluster.yaml",
    "k8s/rayjob-upgrade.yaml",
    "k8s/raycronjob-nightly.yaml",
    "k8s/cronjob-nightly.yaml",
    "systemd/carryover-schedule.service",
    "systemd/carryover-schedule.timer",
    "systemd/env.example",
    "local-stack.sh",
}


# ---------------------------------------------------------------- loading and lookup helpers


def _yaml_files() -> list[Path]:
    return sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])


def _load_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in _yaml_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:  # a leading `---` yields an empty document
                out.append((path.name, doc))
    return out


DOCS = _load_docs()


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in DOCS if d.get("kind") == kind]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _of_kind(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every pod spec inside a workload, Ray CR or CronJob."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet"):
        yield spec["template"]["spec"]
    elif kind == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind in ("RayCluster", "RayJob", "RayCronJob"):
        yield from (g["template"]["spec"] for g in _groups(_cluster_spec(doc)))


def _containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for pod in _pod_specs(doc):
        yield from pod.get("initContainers", [])
        yield from pod["containers"]


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "RayCluster":
        return doc["spec"]
    if doc["kind"] == "RayJob":
        return doc["spec"]["rayClusterSpec"]
    return doc["spec"]["jobTemplate"]["rayClusterSpec"]  # RayCronJob


def _groups(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _secret_keys() -> dict[str, set[str]]:
    """Secret name -> its keys, from the example file (the only place Secrets may live)."""
    return {d["metadata"]["name"]: set(d["stringData"]) for d in _of_kind("Secret")}


def _upgrade_config_text() -> str:
    return _one("ConfigMap", "carryover-upgrade")["data"]["upgrade.yaml"]


def _assert_config_mounted(doc: dict[str, Any], container: dict[str, Any]) -> None:
    """CONFIG_PATH resolves to the upgrade ConfigMap's key inside this container."""
    mount_dir, key = CONFIG_PATH.rsplit("/", 1)
    pod = next(p for p in _pod_specs(doc) if container in p["containers"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mount_dir in mounts, f"{doc['metadata']['name']}: {mount_dir} not mounted"
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[mount_dir])
    cm = _one("ConfigMap", volume["configMap"]["name"])
    assert key in cm["data"]


def _flag(args: list[str], flag: str) -> str:
    """The value after `flag` in an argument list."""
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


# ---------------------------------------------------------------- every document


def test_all_expected_files_exist_and_readme_lists_them():
    present = {str(p.relative_to(INFRA)) for p in INFRA.rglob("*") if p.is_file()}
    assert present >= EXPECTED_FILES, EXPECTED_FILES - present
    readme = (INFRA / "README.md").read_text()
    unlisted = {f for f in present - {"README.md"} if f"`{f}`" not in readme}
    assert not unlisted, f"infra/README.md does not list {sorted(unlisted)}"


def test_every_document_has_identity_and_namespace():
    assert len(DOCS) >= 13
    for fname, doc in DOCS:
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], fname
        assert isinstance(doc.get("kind"), str) and doc["kind"], fname
        name = doc["metadata"]["name"]
        assert DNS1123.match(name) and len(name) <= 63, f"{fname}: bad name {name!r}"
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, f"{fname}: {doc['kind']} {name}"
    assert _one("Namespace")["metadata"]["name"] == NAMESPACE


def test_kinds_and_api_versions():
    kinds = Counter(d["kind"] for _, d in DOCS)
    assert kinds == {
        "Namespace": 1,
        "Secret": 3,
        "ConfigMap": 1,
        "Service": 2,
        "StatefulSet": 1,
        "Deployment": 1,
        "RayCluster": 1,
        "RayJob": 1,
        "RayCronJob": 1,
        "CronJob": 1,
    }
    api = {d["kind"]: d["apiVersion"] for _, d in DOCS}
    assert api["RayCluster"] == api["RayJob"] == api["RayCronJob"] == "ray.io/v1"
    assert api["CronJob"] == "batch/v1"
    assert api["Deployment"] == api["StatefulSet"] == "apps/v1"


def test_no_duplicate_keys_anywhere():
    # yaml.safe_load keeps the last of two equal keys silently; the API server rejects them.
    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
            dups = sorted(k for k, n in Counter(keys).items() if n > 1)
            assert not dups, f"duplicate keys {dups} at {node.start_mark}"
            return super().construct_mapping(node, deep)

    for path in _yaml_files():
        assert list(yaml.load_all(path.read_text(), Loader=UniqueKeys))


def test_containers_have_images_unique_env_and_no_inline_credentials():
    secrets = _secret_keys()
    checked = 0
    for _, doc in DOCS:
        for c in _containers(doc):
            checked += 1
            assert c["image"] and ":" in c["image"], f"{c['name']}: untagged image"
            names = [e["name"] for e in c.get("env", [])]
            assert len(names) == len(set(names)), f"{c['name']}: duplicate env {names}"
            for e in c.get("env", []):
                if e["name"] in SECRET_ENV:
                    assert "value" not in e, f"{c['name']}: {e['name']} inline"
                    ref = e["valueFrom"]["secretKeyRef"]
                    assert ref["key"] in secrets[ref["name"]], ref
            for src in c.get("envFrom", []):
                assert src["secretRef"]["name"] in secrets
    assert checked >= 12


def test_secrets_only_in_example_file_and_only_placeholders():
    for fname, doc in DOCS:
        if doc["kind"] == "Secret":
            assert fname == SECRETS_FILE, f"Secret {doc['metadata']['name']} in {fname}"
            assert "data" not in doc, "base64 `data:` hides what is stored; use stringData"
            assert doc["stringData"]
            assert set(doc["stringData"].values()) == {PLACEHOLDER}, doc["metadata"]["name"]
    assert "never commit" in (K8S / SECRETS_FILE).read_text().lower()
    assert set(_secret_keys()) == {"carryover-s3", "carryover-ray-token", "mlflow-db"}


# ---------------------------------------------------------------- Ray custom resources


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayCronJob"])
def test_ray_cluster_specs(kind: str):
    doc = _one(kind)
    cluster = _cluster_spec(doc)
    assert cluster["rayVersion"] == version("ray"), "cluster Ray must match the client's Ray"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_c = head["template"]["spec"]["containers"][0]
    assert head_c["image"].startswith(IMAGE)
    assert 8265 in {p["containerPort"] for p in head_c["ports"]}
    _assert_config_mounted(doc, head_c)

    workers = cluster["workerGroupSpecs"]
    for g in workers:
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert g["template"]["spec"]["containers"][0]["image"].startswith(IMAGE)
    gpu = [g for g in workers if _gpus(g["template"]["spec"]["containers"][0]) > 0]
    cpu = [g for g in workers if g not in gpu]
    assert len(cpu) == 1 and len(gpu) == 1, [g["groupName"] for g in workers]
    assert gpu[0]["minReplicas"] == 0
    assert "nvidia.com/gpu" in {t["key"] for t in gpu[0]["template"]["spec"]["tolerations"]}
    # A group at minReplicas 0 only ever starts with the autoscaler on.
    assert cluster["enableInTreeAutoscaling"] is True


def test_raycluster_token_auth_from_secret_everywhere():
    doc = _one("RayCluster")
    assert "authOptions" not in doc["spec"]  # manual token: one mechanism, not both
    # The autoscaler sidecar KubeRay adds talks to the GCS as well.
    autoscaler = {"name": "autoscaler", "env": doc["spec"]["autoscalerOptions"]["env"]}
    for c in [*_containers(doc), autoscaler]:
        env = _env(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("carryover-ray-token", "auth_token")


@pytest.mark.parametrize("kind", ["RayJob", "RayCronJob"])
def test_operator_managed_clusters_use_kuberay_token_auth(kind: str):
    # KubeRay polls job status through the dashboard: it must know the token (authOptions).
    cluster = _cluster_spec(_one(kind))
    assert cluster["authOptions"]["mode"] == "token"
    assert all("RAY_AUTH_TOKEN" not in _env(c) for c in _containers(_one(kind)))


def test_rayjob_runs_the_upgrade_entrypoint():
    spec = _one("RayJob")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/upgrade.py"]
    assert (ROOT / argv[1]).is_file()
    assert _flag(argv, "--config") == CONFIG_PATH
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 0 and spec["submitterConfig"]["backoffLimit"] >= 0
    assert "clusterSelector" not in spec  # its own cluster: exactly one of the two


def test_raycronjob_schedules_the_once_check():
    spec = _one("RayCronJob")["spec"]
    assert croniter.is_valid(spec["schedule"])
    assert spec["suspend"] is False
    tmpl = spec["jobTemplate"]
    assert "spec" not in tmpl, "jobTemplate holds RayJob spec fields directly"
    argv = shlex.split(tmpl["entrypoint"])
    assert argv[:3] == ["carryover", "schedule", "--once"]
    assert _flag(argv, "--config") == CONFIG_PATH
    assert tmpl["shutdownAfterJobFinishes"] is True and tmpl["ttlSecondsAfterFinished"] > 0


# ---------------------------------------------------------------- CronJob and services


def test_cronjob_runs_schedule_once_against_the_raycluster_head():
    doc = _one("CronJob")
    spec = doc["spec"]
    assert croniter.is_valid(spec["schedule"]) and spec["schedule"] == "0 2 * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert isinstance(spec["startingDeadlineSeconds"], int) and spec["startingDeadlineSeconds"] > 0
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (c,) = pod["containers"]
    argv = c["command"] + c.get("args", [])
    assert argv[:3] == ["carryover", "schedule", "--once"]
    assert _flag(argv, "--config") == CONFIG_PATH
    cluster = _one("RayCluster")
    port = cluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-port"]
    assert _flag(argv, "--address") == f"http://{cluster['metadata']['name']}-head-svc:{port}"
    env = _env(c)
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    head_env = _env(cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert env["RAY_AUTH_TOKEN"]["valueFrom"] == head_env["RAY_AUTH_TOKEN"]["valueFrom"]
    _assert_config_mounted(doc, c)
    # A locked gallery fails the Job at once instead of retrying into the same lock.
    (rule,) = spec["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"]["containerName"] == c["name"]
    assert rule["onExitCodes"]["values"] == [LOCKED_EXIT]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it


def test_workloads_selectors_and_services_match():
    workloads = [*_of_kind("Deployment"), *_of_kind("StatefulSet")]
    for w in workloads:
        sel = w["spec"]["selector"]["matchLabels"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert sel and sel.items() <= labels.items(), w["metadata"]["name"]
    for svc in _of_kind("Service"):
        sel = svc["spec"]["selector"]
        (target,) = [
            w
            for w in workloads
            if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        ports = {
            p.get("name"): p["containerPort"]
            for c in target["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        assert svc["spec"]["ports"]
        for p in svc["spec"]["ports"]:
            t = p.get("targetPort", p["port"])
            assert (ports[t] if isinstance(t, str) else t) == p["port"], svc["metadata"]["name"]
    sts = _one("StatefulSet")
    governing = _one("Service", sts["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"


def test_mlflow_server_postgres_s3_health_and_hosts():
    dep = _one("Deployment", "mlflow")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    argv = c["command"] + c["args"]
    assert argv[:2] == ["mlflow", "server"]
    db = urlparse(_flag(argv, "--backend-store-uri"))
    assert db.scheme == "postgresql"
    db_svc = _one("Service", db.hostname)
    assert db.port == db_svc["spec"]["ports"][0]["port"] == 5432
    # $(VAR) in args expands only from variables declared in `env`.
    declared = set(_env(c))
    assert set(re.findall(r"\$\((\w+)\)", " ".join(argv))) <= declared
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD"} <= declared
    assert _flag(argv, "--artifacts-destination").startswith("s3://carryover-mlflow/")
    assert "--serve-artifacts" in argv
    assert _flag(argv, "--host") == "0.0.0.0"
    assert int(_flag(argv, "--port")) == c["ports"][0]["containerPort"] == 5000
    assert int(_flag(argv, "--workers")) == 2
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    # MLflow 3 answers 403 to Host headers it does not know: the config's URI must be allowed.
    tracking = urlparse(yaml.safe_load(_upgrade_config_text())["tracking"]["uri"])
    assert tracking.netloc in _flag(argv, "--allowed-hosts").split(",")
    svc_name, ns = tracking.hostname.split(".")[:2]
    assert (svc_name, ns) == ("mlflow", NAMESPACE)
    assert _one("Service", svc_name)["spec"]["ports"][0]["port"] == tracking.port


def test_embedded_upgrade_config_validates(tmp_path: Path):
    path = tmp_path / "upgrade.yaml"
    path.write_text(_upgrade_config_text())
    cfg = load_config(path)
    assert cfg.gallery_uri.startswith("s3://") and cfg.images_uri.startswith("s3://")
    assert cfg.tracking_uri == "http://mlflow.carryover.svc:5000"
    assert cfg.storage.endpoint_url and cfg.storage.endpoint_url.startswith("https://")
    assert cfg.storage.access_key_id is None  # credentials come from the Secret's env
    assert cfg.new_model.uri == f"models:/{cfg.gallery_name}-embedder@candidate"


# ---------------------------------------------------------------- systemd and the local stack


def _unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read_string((SYSTEMD / name).read_text())
    return cp


def test_systemd_service_runs_schedule_once_hardened():
    svc = _unit("carryover-schedule.service")["Service"]
    assert svc["Type"] == "oneshot"
    argv = shlex.split(svc["ExecStart"])
    assert argv[0].startswith("/") and argv[0].endswith("/carryover")
    assert argv[1:3] == ["schedule", "--once"]
    assert _flag(argv, "--config") == CONFIG_PATH
    assert _flag(argv, "--address") == "http://127.0.0.1:8265"
    assert svc["EnvironmentFile"] == "/etc/carryover/env"
    assert svc["User"] not in ("", "root")
    assert svc["NoNewPrivileges"] == "yes" and svc["PrivateTmp"] == "yes"
    assert svc["ProtectSystem"] == "strict" and svc["ReadWritePaths"].startswith("/")
    assert re.fullmatch(r"\d+(h|min|s)?", svc["TimeoutStartSec"])
    assert str(LOCKED_EXIT) in svc["SuccessExitStatus"].split()


def test_systemd_timer_nightly_persistent():
    cp = _unit("carryover-schedule.timer")
    timer = cp["Timer"]
    m = re.fullmatch(r"\*-\*-\* (\d\d):(\d\d):(\d\d)", timer["OnCalendar"])
    assert m, timer["OnCalendar"]
    hour, minute, _ = (int(x) for x in m.groups())
    # Same time of day as the Kubernetes CronJob.
    assert f"{minute} {hour} * * *" == _one("CronJob")["spec"]["schedule"]
    assert timer["Persistent"] == "true"
    assert re.fullmatch(r"\d+(min|s|h)?", timer["RandomizedDelaySec"])
    assert timer["Unit"] == "carryover-schedule.service"
    assert cp["Install"]["WantedBy"] == "timers.target"


def test_systemd_env_example_has_placeholders_only():
    lines = [
        ln
        for ln in (SYSTEMD / "env.example").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    env = dict(ln.split("=", 1) for ln in lines)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"} <= set(env)
    assert all(env[k] == PLACEHOLDER for k in SECRET_ENV & set(env))
    assert env["RAY_AUTH_MODE"] == "token"


def test_local_stack_script_parses_and_enables_token_auth():
    script = INFRA / "local-stack.sh"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN" in text
    assert 'export PATH="$BIN:$PATH"' in text
    assert '--artifacts-destination "s3://$MLFLOW_BUCKET/artifacts"' in text
    assert re.search(r"^\s+(start|stop|status)\)", text, re.M)
    assert {m for m in re.findall(r"^\s+(\w+)\)$", text, re.M)} == {"start", "stop", "status"}
