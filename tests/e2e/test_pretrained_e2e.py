"""Models brought as TorchScript (no classifier head, as pretrained backbones come):
- labelled images, `fit_classifier` on: FastFill ranks rows through a linear head fitted on the
  labelled training pairs, and the planned upgrade mixes transformed, partial and full shards;
- an existing, unlabelled gallery adopted with `carryover import`, then upgraded by
  transformation only: the study, the plan and validation measure recall@10 of the new model's
  own neighbours, and FastFill's regression-only uncertainty tracks h's real error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import spearmanr

from pipeline.config import load_config
from pipeline.context import Context
from pipeline.data.decode import decode_batch
from pipeline.data.prepare import prepare
from pipeline.flows import run_upgrade
from pipeline.gallery.store import Gallery, arrow_to_embeddings
from pipeline.models.store import load_trained
from pipeline.services import models
from tests.e2e.test_upgrade_e2e import TINY

pytestmark = pytest.mark.slow
SHARDS, ROWS = 4, 800
# h trains longer than TINY's 4 epochs: its uncertainty head needs them to rank rows
H_EPOCHS = "transformation.train.epochs=20"


@pytest.fixture(scope="module")
def brought(tmp_path_factory, ray_local) -> dict[str, Path]:
    """Old and new models trained once on labelled digits, kept only as TorchScript."""
    base = tmp_path_factory.mktemp("brought")
    cfg = load_config(None, [*TINY, f"workdir={base}", "gallery_name=ts"])
    prepare("digits", cfg.images_uri, SHARDS, cfg.storage, cfg.data, limit=ROWS)
    ctx, out = Context(cfg, quiet=True), {"images": Path(cfg.images_uri)}
    for role, m in (("old", cfg.old_model), ("new", cfg.new_model)):
        models.train_step(ctx, m)
        net, _ = load_trained(base / "models" / m.name)
        size = m.preprocess.input_size
        out[role] = base / f"{role}.ts"
        torch.jit.save(torch.jit.trace(net.eval(), torch.zeros(2, 1, size, size)), str(out[role]))
    return out


def _tiny_for(*brought: str) -> list[str]:
    """TINY without the training keys of brought models: nothing trains them here."""
    return [s for s in TINY if not any(s.startswith(f"{m}.train.") for m in brought)]


def _transformation_runs(cfg) -> list[dict]:
    return Context(cfg).tracker.search_runs("tags.carryover.step = 'train_transformation'")


def test_torchscript_new_model_with_fastfill_uncertainty_and_partial_backfills(
    brought, tmp_path: Path
) -> None:
    sets = [
        *_tiny_for("new_model"),
        f"workdir={tmp_path}",
        "gallery_name=ts",
        f"images={brought['images']}",
        "new_model.name=v2ts",
        f"new_model.uri={brought['new']}",
        "plan.budget_fraction=0.3",
        "plan.min_gain=0",
        "transformation.fit_classifier=true",  # off by default: the regression term alone
        H_EPOCHS,
    ]
    cfg = load_config(None, sets)
    report = run_upgrade(cfg, quiet=True)
    assert report.serving == "v2ts" and report.validation["ok"] is True
    h = report.transformation
    assert h["loss"] == "fastfill" and h["inner_dim"] == 16 * 32  # FCT's width fits the limit
    assert 0 < h["h_mflops_per_row"] < 64
    tags = [r["tags"]["carryover.fastfill_classifier"] for r in _transformation_runs(cfg)]
    assert tags == ["fitted"]
    curves = report.compat["curves"]
    # h has its uncertainty head, and the curve ranks by it. (The curves of 240 validation
    # digits cannot order uncertainty and random reliably: their AUCs differ by under a point
    # from one run to the next. The real-model benchmark compares them on real photographs.)
    assert set(curves) == {"random", "uncertainty", "oracle"}
    methods = [s["method"] for s in report.plan["shards"]]
    assert {"partial", "full"} & set(methods), methods
    assert report.plan["measure"] == "top-1"
    assert Gallery(cfg.gallery_uri).manifest("v2ts")["rows"] == ROWS


def _uncertainty_vs_error(cfg, new_model: Path) -> float:
    """Spearman correlation of each transformed row's log-variance with h's real error."""
    rows = pa.Table.from_batches(
        list(Gallery(cfg.gallery_uri).iter_embeddings("v2ts", ("key", "embedding", "uncertainty")))
    )
    images = pa.concat_tables(
        pq.read_table(f) for f in sorted(Path(cfg.images_uri).glob("*.parquet"))
    )
    pos = {k: i for i, k in enumerate(images["key"].to_pylist())}
    idx = [pos[k] for k in rows["key"].to_pylist()]
    batch = {
        "key": np.asarray(rows["key"].to_pylist(), dtype=object),
        "image": np.asarray(images["image"].to_pylist(), dtype=object)[idx],
    }
    pre = cfg.new_model.preprocess
    pixels = decode_batch(batch, pre, 10**8)["pixels"]
    x = torch.from_numpy(np.ascontiguousarray(pixels)).view(-1, 1, pre.input_size, pre.input_size)
    with torch.inference_mode():
        new = torch.jit.load(str(new_model))(x).numpy()
    mapped = arrow_to_embeddings(rows["embedding"])
    err = ((_unit(mapped) - _unit(new)) ** 2).sum(1)
    log_var = rows["uncertainty"].to_numpy(zero_copy_only=False).astype(np.float64)
    kept = ~np.isnan(log_var)  # re-embedded rows carry no uncertainty
    return float(spearmanr(log_var[kept], err[kept]).statistic)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _unlabelled_copy(images: Path, out: Path) -> Path:
    out.mkdir()
    for f in sorted(images.glob("*.parquet")):
        t = pq.read_table(f)
        t = t.set_column(t.schema.get_field_index("label"), "label", pa.nulls(len(t), pa.int64()))
        pq.write_table(t, out / f.name)
    return out


def _user_embeddings(images: Path, old_model: Path, out: Path) -> Path:
    """The old gallery as a user's own job wrote it: Parquet files of key + embedding."""
    out.mkdir()
    net, pre = torch.jit.load(str(old_model)), load_config(None, TINY).old_model.preprocess
    for f in sorted(images.glob("*.parquet")):
        t = pq.read_table(f, columns=["key", "image"])
        batch = {k: np.asarray(t[k].to_pylist(), dtype=object) for k in ("key", "image")}
        x = torch.from_numpy(decode_batch(batch, pre, 10**8)["pixels"])
        with torch.inference_mode():
            emb = net(x.view(-1, 1, pre.input_size, pre.input_size)).numpy()
        pq.write_table(
            pa.table({"key": t["key"], "embedding": list(emb.astype(np.float32))}),
            out / f"part-{f.stem}.parquet",
        )
    return out


def _carryover(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_imported_unlabelled_gallery_is_transformed_and_validated_by_recall(
    brought, tmp_path: Path
) -> None:
    images = _unlabelled_copy(brought["images"], tmp_path / "images")
    sets = [
        *_tiny_for("old_model", "new_model"),
        f"workdir={tmp_path}",
        "gallery_name=unlabelled",
        f"images={images}",
        "old_model.name=v1ts",
        f"old_model.uri={brought['old']}",
        "new_model.name=v2ts",
        f"new_model.uri={brought['new']}",
        "plan.budget_fraction=0",  # transform only
        "transformation.linear_skip=true",  # what 1,280-d models get by default
        H_EPOCHS,
    ]
    # adopt the existing gallery: no image is embedded by carryover
    source = _user_embeddings(images, brought["old"], tmp_path / "old-embeddings")
    flags = [x for s in sets for x in ("--set", s)]
    res = _carryover("import", str(source), *flags, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    cfg = load_config(None, sets)
    g = Gallery(cfg.gallery_uri)
    assert g.current() == "v1ts" and g.manifest("v1ts")["rows"] == ROWS
    report = run_upgrade(cfg, quiet=True)
    assert report.stages["ingest"]["status"] == "done" and report.serving == "v2ts"
    assert report.validation["ok"] is True
    # the imported rows have no side-info: no side-info model is trained, h maps old alone
    assert (
        report.stages["side-info"]["status"] == "done"
        and not (tmp_path / "models" / "side-info").exists()
    )
    assert report.transformation["side_info_model"] is None
    # h = the ridge map of the training pairs (penalty chosen on held-out pairs) + residual
    assert report.transformation["ridge_alpha"] > 0
    assert report.transformation["ridge_holdout_mse"] >= 0
    meta = json.loads((tmp_path / "models" / "fct" / "model.json").read_text())
    assert meta["arch"]["linear_skip"] is True
    compat = report.compat
    assert compat["recall_k"] == 10
    cases = {c["name"]: c for c in compat["cases"]}
    assert cases["new/new"]["recall"] == 100.0 and cases["new/new"]["top1"] is None
    fct = next(c for n, c in cases.items() if n.startswith("new/fct"))
    assert cases["old/old"]["recall"] < fct["recall"] < 100.0
    curves = compat["curves"]
    assert "top1" not in curves["random"] and len(curves["random"]["recall"]) == 22
    tags = [r["tags"]["carryover.fastfill_classifier"] for r in _transformation_runs(cfg)]
    assert tags == ["none"]  # no head, no labels: the regression term alone
    # the regression-only head learned where h errs: its log-variance ranks the stored rows
    # by their real error against the new model's own embedding
    rho = _uncertainty_vs_error(cfg, brought["new"])
    assert rho > 0.2, (rho, {k: c["auc_recall"] for k, c in curves.items()})
    plan = report.plan
    assert plan["measure"] == "R@10"
    assert [s["method"] for s in plan["shards"]] == ["transform"] * SHARDS
    assert plan["reembed_rows"] == 0 and plan["estimate"] == "simulated"
    v = report.validation
    assert v["measure"] == "R@10" and v["top1"] == pytest.approx(plan["expected_top1"], abs=1.0)
    assert g.manifest("v2ts")["rows"] == ROWS
