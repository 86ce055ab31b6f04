"""The upgrade's steps over a Context: chains, plan, execute, finalize and validate a version."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.context import Context
from pipeline.display import shard_progress
from pipeline.embed.rates import embed_rate, transform_rate
from pipeline.embed.transform import ChainSpec, TransformChain, chain_spec
from pipeline.evaluate.neighbours import measure_name
from pipeline.evaluate.report import CompatReport
from pipeline.gallery.identity import GalleryIdentity
from pipeline.gallery.records import version_manifest
from pipeline.gallery.store import GalleryError, arrow_to_embeddings, space_of
from pipeline.models.store import build_model
from pipeline.ops import progress as run_progress
from pipeline.runtime import ensure_ray
from pipeline.services import compat_steps as cs
from pipeline.services import models, steps
from pipeline.services.inputs import gallery_version_ref, images_ref, model_ids
from pipeline.upgrade.execute import (
    ExecutorSpec,
    execute_shards,
    execution_summary,
    pending_work,
    probe_new_model,
)
from pipeline.upgrade.facts import ScanSettings, gather_facts
from pipeline.upgrade.plan import Plan, PlanSettings, QualityCurve, ShardFacts, make_plan
from pipeline.upgrade.price import MeasuredRates, price_budget
from pipeline.upgrade.simulate import simulate_plan
from pipeline.upgrade.validate import Tolerances, ValidationReport, ValidationRows, validate_version
from pipeline.upgrade.work import id_ranges


# -- chains ---------------------------------------------------------------------------------
def chains_for(ctx: Context, space: str) -> dict[str, ChainSpec]:
    """The chains that map rows of `space` to the new model: "identity" when already there;
    "side" / "noside" (this upgrade's h, its side-info-free variant), composed after
    registered transformations when the gallery is more than one version behind, or the
    direct map from `space` where the evaluation chose it over composing."""
    cfg = ctx.cfg
    if space == cfg.new_model.name:
        return {"identity": ChainSpec()}
    out: dict[str, ChainSpec] = {}
    prefix: list[tuple[str, Path]] | None = []
    if space != cfg.old_model.name:
        prefix = cs.registry_chain(ctx, space, cfg.old_model.name)
        direct = _direct_chain(ctx, space)
        if direct is not None:
            out["side" if direct.needs_side else "noside"] = direct
    for tc in (cfg.transformation, cs.no_side_info_config(ctx)):
        d = cs.transformation_dir(ctx, tc)
        if prefix is None or not (d / "model.json").exists():
            continue
        spec = chain_spec([p for _, p in prefix] + [d], [n for n, _ in prefix] + [tc.name])
        key = "side" if spec.needs_side else "noside"
        out.setdefault(key, spec)
    if ctx.cfg.plan.no_side_info == "backfill" and "side" in out:
        out.pop("noside", None)  # shards without side-info are re-embedded, not transformed
    return out


def _direct_chain(ctx: Context, space: str) -> ChainSpec | None:
    """The direct map from `space` when this upgrade's evaluation chose it, else None."""
    tc = cs.direct_config(ctx)
    d = cs.transformation_dir(ctx, tc)
    p = cs.default_report_dir(ctx) / "report.json"
    if not (d / "model.json").exists() or not p.exists():
        return None
    choice = json.loads(p.read_text()).get("extra", {}).get("chain_choice") or {}
    if choice.get("chosen") != tc.name:
        return None
    spec = chain_spec([d], [tc.name])
    return spec if spec.metas[0].get("from_model") == space else None


def chain_models(ctx: Context, spec: ChainSpec) -> list[dict[str, Any]]:
    """The registered transformation versions a chain applies, in order (for lineage)."""
    out = []
    for name, meta in zip(spec.names, spec.metas, strict=True):
        info = models.find_model_version(
            ctx, "carryover.config_hash", str(meta.get("config_hash")), "transformation"
        )
        out.append(
            {
                "name": name,
                "from_model": meta.get("from_model"),
                "to_model": meta.get("to_model"),
                "registry_name": ctx.registry_name("transformation"),
                "registry_version": info.version if info else None,
                "run_id": info.run_id if info else None,
            }
        )
    return out


def _space(ctx: Context, source: str) -> str:
    return space_of(ctx.gallery.manifest(source), source)


# -- planning -------------------------------------------------------------------------------
def load_report(ctx: Context) -> dict[str, Any]:
    """The compatibility report `evaluate` wrote (its curves drive the planner)."""
    p = cs.default_report_dir(ctx) / "report.json"
    if not p.exists():
        raise FileNotFoundError(
            f"no evaluation report at {p}: run `carryover upgrade --until evaluate` "
            "(or `carryover evaluate`) first"
        )
    return json.loads(p.read_text())


def _curve(report: dict[str, Any]) -> QualityCurve:
    """The report's backfilling curve, in top-1 (labelled) or recall@k (unlabelled); without a
    transformation there is none, and every shard is re-embedded anyway: a flat curve at the
    new model's own quality."""
    rep = CompatReport.from_json(json.dumps(report))
    key = "top1" if rep.labelled else "recall"
    measure = measure_name(rep.labelled, rep.recall_k)
    if rep.curves:
        return QualityCurve.from_report(rep.curves, key=key, measure=measure)
    top = next((getattr(c, key) for c in rep.cases if c.name == "new/new"), None) or 0.0
    return QualityCurve([0.0, 1.0], [top, top], ordering="none", measure=measure)


def _facts(
    ctx: Context, source: str, chains: dict[str, ChainSpec], quiet: bool
) -> tuple[list[ShardFacts], dict[int, dict[str, int]]]:
    """Every shard's facts, with a progress bar."""
    prog = shard_progress("facts", len(ctx.gallery.manifest(source)["shards"]), quiet)
    rows, t0 = [0], time.perf_counter()

    def tick(rec: dict[str, Any]) -> None:
        rows[0] += rec["rows"]
        rps = rows[0] / max(time.perf_counter() - t0, 1e-9)
        prog.update(prog.task_ids[0], advance=1, rows=rows[0], rps=rps)
        task = prog.tasks[0]
        run_progress.active().shards(int(task.completed), int(task.total or 0), rows[0], rps)

    cfg = ctx.cfg
    try:  # the simulation's validation rows; without images there is nothing to simulate
        probe = steps.split_sample(cfg, "val", cfg.evaluate.max_queries).keys
    except (FileNotFoundError, ValueError):
        probe = None
    scan = ScanSettings(
        cfg.plan.quantiles,
        cfg.embed.actor_num_cpus,
        cfg.plan.parallel_shards,
        cfg.workdir,
        cfg.plan.max_chain_length,
    )
    with prog:
        return gather_facts(ctx.gallery, source, cfg.new_model.name, chains, scan, tick, probe)


def compute_plan(
    ctx: Context,
    source: str,
    report: dict[str, Any],
    quiet: bool = True,
    train_missing: bool = True,
) -> tuple[Plan, list[ShardFacts]]:
    """Facts of every shard of `source`, then the plan under the configured budget.

    Shards without side-info get the side-info-free transformation, trained here when
    missing (`train_missing`) and `plan.no_side_info` is "transform"."""
    cfg, g = ctx.cfg, ctx.gallery
    if not g.has_version(source):
        raise GalleryError(f"{g.uri}: source version {source!r} has no manifest")
    ensure_ray(cfg.ray)
    space = _space(ctx, source)
    chains = chains_for(ctx, space)
    facts, ranks = _facts(ctx, source, chains, quiet)
    needs_noside = any(not f.has_side_info and f.transform is None for f in facts)
    trainable = train_missing and space == cfg.old_model.name and cfg.transformation.enabled
    wants = cfg.plan.no_side_info == "transform" and "noside" not in chains
    if needs_noside and wants and trainable:
        cs.train_transformation_step(ctx, (), cs.no_side_info_config(ctx))
        chains = chains_for(ctx, space)
        facts, ranks = _facts(ctx, source, chains, quiet)
    plan = _plan(ctx, source, facts, _curve(report), measure_rates(ctx, source, chains))
    if space != cfg.old_model.name:
        plan.chain_choice = report.get("extra", {}).get("chain_choice") or {}
    if plan.ok:
        val = _validation_rows(ctx)
        simulate_plan(
            plan, facts, ranks, chains, g, val, cfg.evaluate.metric, cfg.evaluate.recall_k
        )
    return plan, facts


def measure_rates(ctx: Context, source: str, chains: dict[str, ChainSpec]) -> MeasuredRates:
    """The new model's images/s on a sample of the gallery's images and h's rows/s on a
    sample of the source version's rows (plan.measure_rows; 0 or nothing there: None)."""
    cfg, g, rows = ctx.cfg, ctx.gallery, ctx.cfg.plan.measure_rows
    if not rows:
        return MeasuredRates(None, None)
    try:
        files = list(steps.image_shards(cfg).values())
    except FileNotFoundError:  # a gallery whose images are gone: nothing to re-embed
        files = []
    blob = models.blob_of(ctx, cfg.new_model)
    eps, n = embed_rate(
        build_model(blob),
        blob.preprocess,
        files,
        cfg.storage,
        cfg.embed,
        rows,
        steps.image_layout(cfg),
    )
    spec = chains.get("side") or chains.get("noside")
    if spec is None:
        return MeasuredRates(eps, None, n)
    cols = ("key", "embedding", "side_info") if spec.needs_side else ("key", "embedding")
    try:
        batch = next(g.iter_embeddings(source, cols, batch_size=8 * rows), None)
    except GalleryError:  # the first shard has no side-info: h is priced by the profile
        batch = None
    if batch is None:
        return MeasuredRates(eps, None, n)
    old = arrow_to_embeddings(batch.column("embedding"))
    side = arrow_to_embeddings(batch.column("side_info")) if spec.needs_side else None
    return MeasuredRates(eps, transform_rate(TransformChain(spec), old, side), n)


def _plan(
    ctx: Context,
    source: str,
    facts: list[ShardFacts],
    curve: QualityCurve,
    measured: MeasuredRates | None = None,
) -> Plan:
    """The plan of these facts under the configured, priced budget and rules."""
    pc = ctx.cfg.plan
    source_rps = ctx.gallery.manifest(source).get("rows_per_second")
    budget, notes = price_budget(pc, facts, source, source_rps, measured)
    rules = PlanSettings.of(pc).rules(labelled=curve.measure == "top-1")
    gain = curve.full_top1 - curve.transform_top1
    if gain < pc.min_gain and (budget.images != 0 or budget.seconds is not None):
        # The budget still bounds what must be re-embedded; nothing optional is spent.
        rules.spend_optional = False
        notes.append(
            f"a full backfill would gain {gain:+.2f} {curve.measure} over the transformation "
            f"(< plan.min_gain {pc.min_gain}): nothing is re-embedded but what must be"
        )
    plan = make_plan(facts, ctx.cfg.target_version, curve, budget, rules)
    plan.warnings.extend(notes)
    return plan


# -- the labelled validation rows -------------------------------------------------------------
def val_new_embeddings(ctx: Context, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """New-model embeddings of the validation keys (computed once, cached in the workdir):
    the queries of both the plan's estimate and the validation check."""
    blob = models.blob_of(ctx, ctx.cfg.new_model)
    ident = [keys, blob.meta.get("config_hash") or blob.name, steps.image_shards(ctx.cfg)]
    h = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
    p = Path(ctx.cfg.workdir) / "cache" / f"val-{ctx.cfg.new_model.name}-{h}.npz"
    if p.exists():
        z = np.load(p)
        return z["emb"], z["found"]
    emb, found = cs._computed_new(ctx, "val", keys)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez(p, emb=emb, found=found)
    return emb, found


def _validation_rows(ctx: Context) -> ValidationRows:
    """The sampled validation rows (labels None on an unlabelled gallery); their new-model
    embeddings only when there are 2+."""
    sample = steps.split_sample(ctx.cfg, "val", ctx.cfg.evaluate.max_queries)
    keys, labels = sample.keys, sample.labels
    if len(keys) < 2:
        return ValidationRows(keys, labels, np.zeros((len(keys), 0)), np.zeros(len(keys), bool))
    new, found = val_new_embeddings(ctx, keys)
    return ValidationRows(keys, labels, new, found)


# -- execution ------------------------------------------------------------------------------
def executor_spec(ctx: Context, source: str, run_id: str | None) -> ExecutorSpec:
    """The shard executors of this upgrade: target, chains, new model and lineage."""
    cfg, g = ctx.cfg, ctx.gallery
    chains = chains_for(ctx, _space(ctx, source))
    return ExecutorSpec(
        gallery_uri=g.uri,
        # Credentials resolved here: Ray workers may not share the driver's environment.
        storage=g.storage.resolved() if g.storage is not None else None,
        target=cfg.target_version,
        target_model=cfg.new_model.name,
        chains=chains,
        new_blob=models.blob_of(ctx, cfg.new_model),
        embed_cfg=cfg.embed,
        side_dim=int(g.manifest(source).get("side_info_dim") or 0),
        retries=cfg.plan.retries,
        lineage={
            "run_id": run_id,
            "model_registry_version": models.registry_version_of(ctx, cfg.new_model),
            "chains": {k: chain_models(ctx, spec) for k, spec in chains.items()},
        },
        num_cpus=cfg.embed.actor_num_cpus,
        parallel=cfg.plan.parallel_shards,
        layout=steps.image_layout(cfg),
        max_hops=cfg.plan.max_chain_length,
    )


def execute_plan(
    ctx: Context, plan: Plan, run: Any, quiet: bool, parent: Any = None
) -> dict[str, Any]:
    """Run every planned shard not committed yet on a Ray Data actor pool; the run (and the
    upgrade's `parent` run) record the datasets and models it read."""
    g, target = ctx.gallery, ctx.cfg.target_version
    done = g.committed_shards(target)
    work = pending_work(plan, done)
    spec = executor_spec(ctx, plan.shards[0].source_version, run.run_id)
    probe_new_model(spec.new_blob, work, ctx.cfg.storage, ctx.cfg.embed, spec.layout)
    ensure_ray(ctx.cfg.ray)
    run.set_tags({"carryover.shards": id_ranges(sorted(w.shard_id for w in work))})
    t0, rows, records = time.perf_counter(), 0, []
    prog = shard_progress(f"execute {target}", len(plan.shards), quiet)
    prog.update(prog.task_ids[0], completed=len(done))
    with prog:
        for rec in execute_shards(spec, work):
            rows += rec["rows"]
            records.append(rec)
            rps = rows / max(time.perf_counter() - t0, 1e-9)
            prog.update(prog.task_ids[0], advance=1, rows=rows, rps=rps)
            run_progress.active().shards(len(done) + len(records), len(plan.shards), rows, rps)
            run.log_metrics(
                {"shard_rows": rec["rows"], "shard_seconds": rec["seconds"]},
                step=int(rec["shard_id"]),
            )
    secs = time.perf_counter() - t0
    all_recs = list(g.committed_shards(target).values())
    run.log_dict(sorted(all_recs, key=lambda r: r["shard_id"]), "shards.json")
    for r in (run, parent) if parent is not None else (run,):
        log_upgrade_inputs(ctx, r, plan, spec)
    return execution_summary(records, len(done), secs)


def log_upgrade_inputs(ctx: Context, run: Any, plan: Plan, spec: ExecutorSpec) -> None:
    """An upgrade run's lineage in MLflow: the source version, the image shards re-embedded
    rows came from, the new embedder and every transformation version applied."""
    source = plan.shards[0].source_version
    refs = [gallery_version_ref(ctx.gallery, ctx.cfg.gallery_name, source, "source")]
    if any(w.method != "transform" for w in plan.shards):
        files = steps.image_shards(ctx.cfg)
        refs.append(images_ref(ctx.cfg.images_uri, files, ctx.cfg.storage, "images"))
    used = [(ctx.registry_name(), spec.lineage["model_registry_version"])]
    for chain in spec.lineage["chains"].values():
        used += [(m["registry_name"], m["registry_version"]) for m in chain]
    run.log_inputs(refs, model_ids(ctx, used))


def finalize_target(ctx: Context, plan: Plan, run_id: str | None) -> dict[str, Any]:
    """Index the built version and write its manifest last (it becomes visible)."""
    cfg, g = ctx.cfg, ctx.gallery
    target, source = cfg.target_version, plan.shards[0].source_version
    recs = list(g.committed_shards(target).values())
    missing = {s.shard_id for s in plan.shards} - {int(r["shard_id"]) for r in recs}
    if missing:
        raise GalleryError(f"{target}: shards {sorted(missing)} are not committed; rerun")
    dim = models.blob_of(ctx, cfg.new_model).embedding_dim
    index = steps.index_version(ctx, target, recs, dim)
    src = g.manifest(source)
    plan_summary = {
        "counts": plan.counts,
        "expected_top1": plan.expected_top1,
        "reembed_rows": plan.reembed_rows,
    }
    m = g.finalize(
        target,
        version_manifest(
            GalleryIdentity.of_config(cfg),
            method="planned",
            model=cfg.new_model.name,
            registry_version=models.registry_version_of(ctx, cfg.new_model),
            embedding_dim=dim,
            side_info_model=src.get("side_info_model"),
            side_info_dim=src.get("side_info_dim", 0),
            index=index,
            run_id=run_id,
            source_version=source,
            plan=plan_summary,
        ),
    )
    return {
        "rows": m["rows"],
        "rejected": m["rejected"],
        "shards": len(m["shards"]),
        "index": index,
    }


def validate_target(ctx: Context, plan: Plan) -> ValidationReport:
    """Keys, values, dimension and retrieval quality of the built version vs the plan."""
    cfg = ctx.cfg
    tol = Tolerances(
        cfg.evaluate.min_top1_drop_tolerance, cfg.embed.min_distinct_fraction, cfg.evaluate.recall_k
    )
    val = _validation_rows(ctx)
    return validate_version(ctx.gallery, cfg.target_version, plan, val, tol, cfg.evaluate.metric)
