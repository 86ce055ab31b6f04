"""End to end on real parts: moto S3 endpoint, mlflow server, local Ray (2 CPUs)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.context import Context
from pipeline.data.prepare import prepare
from pipeline.flows import run_upgrade
from pipeline.gallery.store import Gallery
from pipeline.io import uri
from pipeline.services import models, steps
from pipeline.services.lineage import gallery_lineage
from pipeline.services.search import search_gallery

pytestmark = pytest.mark.slow

TINY = [
    "old_model.train.epochs=2",
    "new_model.train.epochs=3",
    "old_model.architecture.widths=[4,8]",
    "new_model.architecture.widths=[8,16]",
    "new_model.architecture.embedding_dim=32",
    "old_model.preprocess.input_size=8",
    "new_model.preprocess.input_size=8",
    "embed.batch_size=128",
    "side_info.architecture.widths=[4,8]",
    "side_info.architecture.embedding_dim=8",
    "side_info.train.epochs=2",
    "transformation.train.epochs=4",
    # small batches: more optimizer steps (and settled BatchNorm statistics) on tiny data
    "old_model.train.batch_size=32",
    "new_model.train.batch_size=32",
    "side_info.train.batch_size=64",
    "transformation.train.batch_size=32",
    "transformation.train.lr=0.003",
    "adapters.epochs=5",
    "adapters.hidden=16",
    # the planner's costs, pinned: measured on these tiny models, h and the new model cost about
    # the same, so on a slow or busy machine "transforming does not pay" would flip the plans
    "plan.embed_rows_per_second=500",
    "plan.transform_rows_per_second=50000",
]


def test_upgrade_all_on_s3_with_mlflow_server(
    tmp_path: Path, s3_server, mlflow_server, ray_local
) -> None:
    overrides = TINY + [
        f"workdir={tmp_path}",
        f"gallery={s3_server.uri('e2e', 'gallery')}",
        f"images={s3_server.uri('e2e', 'images')}",
        f"storage.endpoint_url={s3_server.endpoint_url}",
        f"tracking.uri={mlflow_server}",
        "gallery_name=e2e",
        # DDP across two Ray Train workers (gloo on CPU); half a CPU each leaves room for data
        "new_model.train.num_workers=2",
        "new_model.train.cpus_per_worker=0.5",
    ]
    cfg = load_config(None, overrides)
    res = prepare("digits", cfg.images_uri, 3, cfg.storage, cfg.data, limit=600)
    assert res.rows == 600 and len(res.files) == 3
    report = run_upgrade(cfg, quiet=True)
    g = Gallery(cfg.gallery_uri, cfg.storage)
    assert g.current() == "v2"
    assert g.versions() == ["v1", "v2"]
    for v in ("v1", "v2"):
        m = g.manifest(v)
        assert m["rows"] + m["rejected"] == 600
        assert len(m["shards"]) == 3
        assert all(s["checksum"].startswith("sha256:") for s in m["shards"])
        assert uri.exists(uri.join(g.index_uri(v), "index.faiss"), cfg.storage)
    sources: dict[str, int] = {}
    for b in g.iter_embeddings("v2", columns=("source",)):
        for src in b.column("source").to_pylist():
            sources[src] = sources.get(src, 0) + 1
    # the default plan re-embeds a quarter of the rows (read by key from S3), transforms the rest
    assert set(sources) == {"backfill:v2", "transform:v1->v2"}
    assert sources["backfill:v2"] == report.plan["reembed_rows"] == 150
    assert report.validation["ok"] and report.validation["top1"] > 0
    # FCT side-information is stored next to every old embedding and carried into v2 (the
    # next upgrade's transformation needs it)
    v1 = next(iter(g.iter_embeddings("v1", columns=("key", "side_info"))))
    assert v1.schema.field("side_info").type.list_size == 8
    assert g.manifest("v1")["side_info_dim"] == 8 and g.manifest("v2")["side_info_dim"] == 8
    # compatibility report: cases, 22-point curves per ordering, plots, metrics on the server
    compat = report.compat
    cases = {c["name"]: c for c in compat["cases"]}
    assert {"old/old", "new/new", "new/fct", "adapter:procrustes new→old"} <= set(cases)
    assert set(compat["curves"]) == {"random", "uncertainty", "oracle"}
    for curve in compat["curves"].values():
        assert len(curve["fractions"]) == 22 and curve["fractions"][-1] == 1.0
        assert curve["top1"][-1] == pytest.approx(cases["new/new"]["top1"], abs=0.01)
    for name in ("report.json", "backfill_curves.png", "compat_matrix.png", "cases.png"):
        assert Path(report.compat_files[name]).read_bytes()[:4] in (b"{\n  ", b"\x89PNG")
    tracker = Context(cfg).tracker
    (side,) = tracker.latest_versions("e2e-side-info")
    assert side.tags["carryover.trained_classes"] == "[0, 1, 2, 3, 4]"
    (trans,) = tracker.latest_versions("e2e-transformation")
    assert trans.tags["carryover.from_model"] == "v1" and trans.tags["carryover.to_model"] == "v2"
    assert trans.tags["carryover.side_info_model"] == "side-info" and "candidate" in trans.aliases
    adapters = {v.tags["carryover.adapter"] for v in tracker.latest_versions("e2e-query-adapter")}
    assert adapters == {"procrustes", "low_rank", "residual_mlp"}
    ev = tracker.get_run(compat["extra"]["run_id"])
    assert ev["metrics"]["top1_new_new"] == pytest.approx(cases["new/new"]["top1"])
    assert "auc_top1_uncertainty" in ev["metrics"]
    # search by key from the serving version, over the S3 gallery
    ctx = Context(cfg)
    key = next(iter(g.iter_embeddings("v2", columns=("key",)))).column("key")[0].as_py()
    hits = search_gallery(ctx, key=key, k=5)
    assert hits.version == "v2" and len(hits.keys) == 5 and key not in hits.keys
    assert len(hits.labels) == 5 and all(isinstance(y, int) for y in hits.labels)
    # registry: serving alias on v2's model, lineage runs exist on the server
    info = ctx.tracker.get_alias("e2e-embedder", "serving")
    assert info is not None and info.version == g.manifest("v2")["registry_version"]
    lin = gallery_lineage(ctx)
    assert [v.version for v in lin.versions] == ["v1", "v2"] and lin.serving == "v2"
    assert lin.versions[1].embedder["version"] == info.version
    assert lin.versions[1].run["name"] == "upgrade" and lin.versions[1].run["status"] == "FINISHED"
    for v in lin.versions:
        assert len(v.shards) == 3 and all(s.run_found for s in v.shards)
        assert {s.method for s in v.shards} <= {"embed", "transform", "partial", "full"}
    assert all(s.source_version == "v1" and s.transformation for s in lin.versions[1].shards)
    # the plan and the manifest are artifacts of the upgrade run, stored on the S3 endpoint
    arts = ctx.tracker.list_artifacts(report.parent_run_id)
    assert {"plan.json", "manifest.json"} <= set(arts)
    exp_id = ctx.tracker.experiment_id
    on_s3 = uri.join(s3_server.uri("mlflow-artifacts"), exp_id, report.parent_run_id, "artifacts")
    assert {"plan.json", "manifest.json"} <= set(uri.list_dir(on_s3, cfg.storage))
    # rollback moves both back
    steps.rollback_step(ctx)
    assert g.current() == "v1"
    assert (
        ctx.tracker.get_alias("e2e-embedder", "serving").version
        == g.manifest("v1")["registry_version"]
    )


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_undecodable_image_is_rejected_not_fatal(tmp_path: Path, ray_local) -> None:
    cfg = load_config(None, TINY + [f"workdir={tmp_path}", "gallery_name=bad"])
    prepare("digits", cfg.images_uri, 2, cfg.storage, cfg.data, limit=200)
    # add a third shard holding good rows, a truncated PNG, junk bytes and an empty image
    good = _png(np.full((8, 8), 128, np.uint8))
    t = pa.table(
        {
            "key": ["ok-1", "trunc", "junk", "empty", "ok-2"],
            "image": [good, good[:20], b"not an image", b"", good],
            "label": [1, 1, 2, 3, 4],
            "split": ["train"] * 5,
        }
    )
    uri.write_table(t, uri.join(cfg.images_uri, "shard-00002.parquet"))
    ctx = Context(cfg, quiet=True)
    models.train_step(ctx, cfg.old_model)
    r = steps.embed_version_step(ctx, cfg.old_model, "embed")
    assert r.rows + r.rejected == 205
    assert r.rejected == 3
    g = ctx.gallery
    rej = uri.read_table(g.rejects_uri("v1", 2)).to_pydict()
    assert sorted(rej["key"]) == ["empty", "junk", "trunc"]
    reasons = dict(zip(rej["key"], rej["reason"], strict=True))
    assert reasons["empty"] == "empty image bytes"
    assert reasons["junk"].startswith("cannot decode image")
    shard2 = g.manifest("v1")["shards"][2]
    assert shard2["rows"] == 2 and shard2["rejected"] == 3 and shard2["rows_in"] == 5
    # rerun resumes: nothing is redone
    r2 = steps.embed_version_step(ctx, cfg.old_model, "embed")
    assert r2.skipped and r2.rows == r.rows


def test_cli_errors_name_the_offending_item(tmp_path: Path) -> None:
    exe = [sys.executable, "-m", "pipeline.cli"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("new_model: {train: {epochz: 3}}\n")
    p = subprocess.run(exe + ["config", "-c", str(bad)], capture_output=True, text=True)
    assert p.returncode == 2 and "new_model.train.epochz: unknown key" in p.stderr
    bad.write_text("gallery: [oops\n")
    p = subprocess.run(exe + ["config", "-c", str(bad)], capture_output=True, text=True)
    assert p.returncode == 2 and "malformed YAML" in p.stderr
    p = subprocess.run(
        exe
        + [
            "data",
            "prepare",
            "--source",
            str(tmp_path / "missing.npz"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and "missing.npz" in p.stderr
    p = subprocess.run(exe + ["train", "--which", "newest"], capture_output=True, text=True)
    err = " ".join(p.stderr.split())
    assert p.returncode == 2 and "'newest' is not one of" in err and "'side-info'" in err
    p = subprocess.run(
        exe + ["train", "--which", "transformation", "--set", f"workdir={tmp_path}"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and "'v1' has no uri and has not been trained yet" in p.stderr
    p = subprocess.run(exe + ["--help"], capture_output=True, text=True)
    assert p.returncode == 0
    for cmd in (
        "prepare",
        "train",
        "ingest",
        "backfill",
        "evaluate",
        "promote",
        "rollback",
        "search",
        "versions",
        "demo",
        "upgrade",
    ):
        assert cmd in p.stdout
    p = subprocess.run(exe + ["search", "--help"], capture_output=True, text=True)
    assert "--key" in p.stdout and "--image" in p.stdout and json is not None


def test_search_cli_by_key_and_image(tmp_path: Path, ray_local) -> None:
    sets = TINY + [f"workdir={tmp_path}", "gallery_name=srch"]
    cfg = load_config(None, sets)
    prepare("digits", cfg.images_uri, 2, cfg.storage, cfg.data, limit=300)
    ctx = Context(cfg, quiet=True)
    models.train_step(ctx, cfg.old_model)
    steps.embed_version_step(ctx, cfg.old_model, "embed")
    steps.promote_step(ctx, "v1")
    flags = [a for s in sets for a in ("--set", s)]
    exe = [sys.executable, "-m", "pipeline.cli"]
    key = next(iter(ctx.gallery.iter_embeddings("v1", columns=("key",)))).column("key")[0]
    p = subprocess.run(
        exe + ["search", "--key", key.as_py(), "-k", "3", "--json", *flags],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["version"] == "v1" and len(out["keys"]) == 3
    img = tmp_path / "q.png"
    img.write_bytes(_png((np.eye(8) * 255).astype(np.uint8)))
    p = subprocess.run(
        exe + ["search", "--image", str(img), "-k", "4", "--json", *flags],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["keys"]) == 4
    p = subprocess.run(
        exe + ["search", "--key", "no-such-key", *flags], capture_output=True, text=True
    )
    assert p.returncode == 2 and "no-such-key" in p.stderr  # bad input
    p = subprocess.run(exe + ["versions", *flags], capture_output=True, text=True)
    assert p.returncode == 0 and "v1" in p.stdout
