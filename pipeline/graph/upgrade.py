"""The upgrade job graph: models → transformation → evaluate → facts → plan → execute shards →
index → validate → promote. Each stage records completion beside the version it builds."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.config import ConfigError
from pipeline.context import Context
from pipeline.embed.probe import probe_model
from pipeline.embed.transform import ChainSpec, chain_spec
from pipeline.gallery.identity import GalleryIdentity
from pipeline.gallery.store import GalleryError
from pipeline.graph import compat_steps as cs
from pipeline.graph import steps
from pipeline.graph.dag import Stage, StageLog
from pipeline.io import uri as uri_io
from pipeline.plan.planner import (
    TRANSFORM_SPEEDUP,
    Budget,
    Plan,
    PlanRules,
    QualityCurve,
    ShardFacts,
    make_plan,
)
from pipeline.runtime import ensure_ray

DEFAULT_EMBED_RPS = 500.0
# Config sections whose change makes an in-progress version a different upgrade.
IDENTITY_KEYS = (
    "gallery",
    "images",
    "old_model",
    "new_model",
    "side_info",
    "transformation",
    "data",
    "plan.target_version",
    "plan.budget_fraction",
    "plan.budget_images",
    "plan.budget_seconds",
    "plan.target_top1",
    "plan.full_threshold",
    "plan.min_partial_fraction",
    "plan.min_gain",
    "plan.no_side_info",
)


def shard_progress(label: str, total: int, quiet: bool) -> Progress:
    """Shards done/total, rows, rows/s and ETA."""
    p = Progress(
        TextColumn(f"{label}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} shards"),
        TextColumn("{task.fields[rows]:,} rows  {task.fields[rps]:,.0f} rows/s"),
        TimeRemainingColumn(),
        disable=quiet,
    )
    p.add_task(label, total=total, rows=0, rps=0.0)
    return p


# -- chains ---------------------------------------------------------------------------------
def _registry_chain(ctx: Context, src: str, dst: str) -> list[tuple[str, Path]] | None:
    """Registered transformations composing `src` → `dst` (downloaded), or None."""
    from pipeline.plan.facts import find_chain

    name = ctx.registry_name("transformation")
    edges, by = [], {}
    for info in reversed(ctx.tracker.latest_versions(name, limit=1000)):
        a, b = info.tags.get("carryover.from_model"), info.tags.get("carryover.to_model")
        if a and b:
            label = f"{info.tags.get('carryover.model', 'h')}@{info.version}"
            edges.append((a, b, label))
            by[label] = info
    chain = find_chain(edges, src, dst)
    if chain is None:
        return None
    out = []
    for label in chain:
        info = by[label]
        d = Path(ctx.cfg.workdir) / "models" / "_registry" / f"{name}-{info.version}"
        if not (d / "model.json").exists():
            d = Path(ctx.tracker.download_model(f"models:/{name}/{info.version}", d))
        out.append((label, d))
    return out


def chains_for(ctx: Context, space: str) -> dict[str, ChainSpec]:
    """The chains that map rows of `space` to the new model: "identity" when already there;
    "side" / "noside" (this upgrade's h, its side-info-free variant), composed after
    registered transformations when the gallery is more than one version behind."""
    cfg = ctx.cfg
    if space == cfg.new_model.name:
        return {"identity": ChainSpec()}
    prefix: list[tuple[str, Path]] = []
    if space != cfg.old_model.name:
        found = _registry_chain(ctx, space, cfg.old_model.name)
        if found is None:
            return {}
        prefix = found
    out: dict[str, ChainSpec] = {}
    for tc in (cfg.transformation, cs.no_side_info_config(ctx)):
        d = cs.transformation_dir(ctx, tc)
        if not (d / "model.json").exists():
            continue
        spec = chain_spec([p for _, p in prefix] + [d], [n for n, _ in prefix] + [tc.name])
        key = "side" if spec.needs_side else "noside"
        out.setdefault(key, spec)
    if ctx.cfg.plan.no_side_info == "backfill" and "side" in out:
        out.pop("noside", None)  # shards without side-info are re-embedded, not transformed
    return out


def chain_models(ctx: Context, spec: ChainSpec) -> list[dict[str, Any]]:
    """The registered transformation versions a chain applies, in order (for lineage)."""
    out = []
    for name, meta in zip(spec.names, spec.metas, strict=True):
        info = steps.find_model_version(
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


def _id_ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (shard ids fit a tag however many there are)."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# -- planning -------------------------------------------------------------------------------
def _for_workers(storage: Any) -> Any:
    """Storage settings with credentials resolved here: Ray workers may not share the driver's
    environment (a local Ray started before AWS_* were set, or another node)."""
    return storage.resolved() if storage is not None else None


def budget_of(ctx: Context, facts: list[ShardFacts], source: str) -> tuple[Budget, list]:
    """The configured budget in images and seconds, priced with measured throughputs: embedding
    from plan.embed_rows_per_second, else the source version's ingest, else the throughput
    profile; transforming from plan.transform_rows_per_second, else the profile."""
    pc, notes = ctx.cfg.plan, []
    total = sum(f.rows for f in facts)
    caps = [pc.budget_images] if pc.budget_images is not None else []
    if pc.budget_fraction is not None:
        caps.append(int(round(pc.budget_fraction * total)))
    profile = _profile(pc.throughput_profile)
    rps = pc.embed_rows_per_second or ctx.gallery.manifest(source).get("rows_per_second")
    rps = rps or (profile.embed_images_per_second if profile else None)
    if not rps:
        rps = DEFAULT_EMBED_RPS
        notes.append(f"no measured embedding throughput for {source}: assuming {rps:.0f} rows/s")
    trps = pc.transform_rows_per_second or (profile.transform_rows_per_second if profile else None)
    if not trps and pc.budget_seconds is not None:
        notes.append(
            "no measured transformation throughput (plan.throughput_profile): a transform is "
            f"priced at 1/{TRANSFORM_SPEEDUP:.0f} of an embedding"
        )
    return (
        Budget(
            images=min(caps) if caps else None,
            seconds=pc.budget_seconds,
            embed_rows_per_second=float(rps),
            scan_rows_per_second=pc.scan_rows_per_second,
            transform_rows_per_second=float(trps) if trps else None,
            origin=_budget_origin(pc, total),
        ),
        notes,
    )


def _budget_origin(pc: Any, total: int) -> str:
    """The settings that set the budget, as a user would write them."""
    out = [f"plan.budget_fraction={pc.budget_fraction} of {total:,} rows"]
    out = out if pc.budget_fraction is not None else []
    out += [f"plan.budget_images={pc.budget_images}"] if pc.budget_images is not None else []
    out += [f"plan.budget_seconds={pc.budget_seconds}"] if pc.budget_seconds is not None else []
    return ", ".join(out)


def _profile(path: str | None) -> Any:
    if not path:
        return None
    from pipeline.bench.profile import ThroughputProfile

    try:
        return ThroughputProfile.load(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"plan.throughput_profile {path!r}: cannot read it: {e}") from None


def load_report(ctx: Context) -> dict[str, Any]:
    """The compatibility report `evaluate` wrote (its curves drive the planner)."""
    p = cs.default_report_dir(ctx) / "report.json"
    if not p.exists():
        raise FileNotFoundError(
            f"no evaluation report at {p}: run `carryover upgrade --until evaluate` "
            "(or `carryover evaluate`) first"
        )
    return json.loads(p.read_text())


def compute_plan(
    ctx: Context,
    source: str,
    report: dict[str, Any],
    quiet: bool = True,
    train_missing: bool = True,
) -> tuple[Plan, list[dict[str, Any]]]:
    """Facts of every shard of `source`, then the plan under the configured budget.

    Shards without side-info get the side-info-free transformation, trained here when
    missing (`train_missing`) and `plan.no_side_info` is "transform"."""
    cfg, g = ctx.cfg, ctx.gallery
    if not g.has_version(source):
        raise GalleryError(f"{g.uri}: source version {source!r} has no manifest")
    ensure_ray(cfg.ray)
    space = g.manifest(source).get("model") or source
    chains = chains_for(ctx, space)
    facts, work = _facts(ctx, source, chains, quiet)
    needs_noside = any(not f.has_side_info and f.transform is None for f in facts)
    trainable = train_missing and space == cfg.old_model.name and cfg.transformation.enabled
    wants = cfg.plan.no_side_info == "transform" and "noside" not in chains
    if needs_noside and wants and trainable:
        cs.train_transformation_step(ctx, None, (), cs.no_side_info_config(ctx))
        chains = chains_for(ctx, space)
        facts, work = _facts(ctx, source, chains, quiet)
    budget, notes = budget_of(ctx, facts, source)
    pc = cfg.plan
    rules = PlanRules(pc.full_threshold, pc.min_partial_fraction, pc.target_top1)
    curve = _curve(report)
    gain = curve.full_top1 - curve.transform_top1
    if gain < pc.min_gain and (budget.images != 0 or budget.seconds is not None):
        # The budget still bounds what must be re-embedded; nothing optional is spent.
        rules.spend_optional = False
        notes.append(
            f"a full backfill would gain {gain:+.2f} top-1 over the transformation "
            f"(< plan.min_gain {pc.min_gain}): nothing is re-embedded but what must be"
        )
    plan = make_plan(facts, cfg.target_version, curve, budget, rules)
    plan.warnings.extend(notes)
    if plan.ok:
        simulate_plan(ctx, plan, facts, work, chains)
    return plan, work


def _curve(report: dict[str, Any]) -> QualityCurve:
    """The report's backfilling curve; without a transformation there is none, and every
    shard is re-embedded anyway: a flat curve at the new model's own quality."""
    if report.get("curves"):
        return QualityCurve.from_report(report["curves"])
    top = next((c["top1"] for c in report["cases"] if c["name"] == "new/new"), 0.0)
    return QualityCurve([0.0, 1.0], [top, top], ordering="none")


def _facts(ctx, source, chains, quiet) -> tuple[list[ShardFacts], list[dict[str, Any]]]:
    from pipeline.plan.facts import gather_facts

    n = len(ctx.gallery.manifest(source)["shards"])
    prog = shard_progress("facts", n, quiet)
    rows = [0]
    t0 = time.perf_counter()

    def tick(rec: dict[str, Any]) -> None:
        rows[0] += rec["rows"]
        rps = rows[0] / max(time.perf_counter() - t0, 1e-9)
        prog.update(prog.task_ids[0], advance=1, rows=rows[0], rps=rps)

    e = ctx.cfg.embed
    try:  # the simulation's validation rows; without images there is nothing to simulate
        probe = steps.validation_labels(ctx.cfg)["key"].to_pylist()
    except (FileNotFoundError, ValueError):
        probe = None
    with prog:
        return gather_facts(
            ctx.gallery,
            source,
            ctx.cfg.new_model.name,
            chains,
            ctx.cfg.plan.quantiles,
            e.actor_num_cpus,
            ctx.cfg.plan.parallel_shards,
            tick,
            probe,
        )


# -- execution ------------------------------------------------------------------------------
def _probe_new_model(blob: Any, items: list[dict[str, Any]], cfg: Any) -> None:
    """Before shards re-embed with the new model, try it on a sample of their images: a
    collapsed or NaN model is refused before any shard is written with it."""
    files = [
        w["image_file"]
        for w in items
        if w["method"] in ("partial", "full")
        and w.get("image_file")
        and uri_io.exists(w["image_file"], cfg.storage)
    ]
    if files:
        probe_model(blob, files, cfg.storage, cfg.embed)


def execute_plan(
    ctx: Context, plan: Plan, work: list[dict[str, Any]], run: Any, quiet: bool
) -> dict[str, Any]:
    """Run every planned shard not committed yet on a Ray Data actor pool."""
    from pipeline.embed.upgrade import ShardExecutor, run_shards

    cfg, g = ctx.cfg, ctx.gallery
    target = cfg.target_version
    if not plan.ok:
        blocked = [s.shard_id for s in plan.shards if s.method == "blocked"]
        raise GalleryError(f"the plan has blocked shards {blocked}: see `carryover plan`")
    done = g.committed_shards(target)
    source = plan.shards[0].source_version
    space = g.manifest(source).get("model") or source
    chains = chains_for(ctx, space)
    by_id = {w["shard_id"]: w for w in work}
    items = []
    for sp in plan.shards:
        if sp.shard_id in done:
            continue
        w = dict(by_id[sp.shard_id])
        w.update(method=sp.method, reembed_rows=sp.reembed_rows)
        items.append(w)
    new_blob = cs.blob_of(ctx, cfg.new_model)
    _probe_new_model(new_blob, items, cfg)
    ensure_ray(cfg.ray)
    kwargs = {
        "gallery_uri": g.uri,
        "storage": _for_workers(g.storage),
        "target": target,
        "target_model": cfg.new_model.name,
        "chains": chains,
        "new_blob": new_blob,
        "embed_cfg": cfg.embed,
        "side_dim": int(g.manifest(source).get("side_info_dim") or 0),
        "retries": cfg.plan.retries,
        "lineage": {
            "run_id": run.run_id,
            "model_registry_version": steps.registry_version_of(ctx, cfg.new_model),
            "chains": {k: chain_models(ctx, spec) for k, spec in chains.items()},
        },
    }
    run.set_tags({"carryover.shards": _id_ranges(sorted(int(w["shard_id"]) for w in items))})
    t0, rows, records = time.perf_counter(), 0, []
    prog = shard_progress(f"execute {target}", len(plan.shards), quiet)
    prog.update(prog.task_ids[0], completed=len(done))
    with prog:
        for rec in run_shards(
            ShardExecutor, kwargs, items, cfg.embed.actor_num_cpus, cfg.plan.parallel_shards
        ):
            rows += rec["rows"]
            records.append(rec)
            rps = rows / max(time.perf_counter() - t0, 1e-9)
            prog.update(prog.task_ids[0], advance=1, rows=rows, rps=rps)
            run.log_metrics(
                {"shard_rows": rec["rows"], "shard_seconds": rec["seconds"]},
                step=int(rec["shard_id"]),
            )
    secs = time.perf_counter() - t0
    all_recs = list(g.committed_shards(target).values())
    run.log_dict(sorted(all_recs, key=lambda r: r["shard_id"]), "shards.json")
    return {
        "shards_executed": len(records),
        "shards_resumed": len(done),
        "rows": rows,
        "reembedded_rows": sum(r["reembed_rows"] for r in records),
        "fallback_rows": sum(r["fallback_rows"] for r in records),
        "rejected_rows": sum(r["rejected"] for r in records),
        "seconds": round(secs, 2),
        "rows_per_second": round(rows / secs, 1) if secs and rows else 0.0,
    }


def finalize_target(ctx: Context, plan: Plan, run_id: str | None) -> dict[str, Any]:
    """Index the built version and write its manifest last (it becomes visible)."""
    cfg, g = ctx.cfg, ctx.gallery
    target, source = cfg.target_version, plan.shards[0].source_version
    recs = list(g.committed_shards(target).values())
    missing = {s.shard_id for s in plan.shards} - {int(r["shard_id"]) for r in recs}
    if missing:
        raise GalleryError(f"{target}: shards {sorted(missing)} are not committed; rerun")
    dim = cs.blob_of(ctx, cfg.new_model).embedding_dim
    index = steps.index_version(ctx, target, recs, dim)
    src = g.manifest(source)
    m = g.finalize(
        target,
        {
            **GalleryIdentity.of_config(cfg).manifest_fields(),
            "method": "planned",
            "model": cfg.new_model.name,
            "registry_version": steps.registry_version_of(ctx, cfg.new_model),
            "embedding_dim": dim,
            "side_info_model": src.get("side_info_model"),
            "side_info_dim": src.get("side_info_dim", 0),
            "source_version": source,
            "plan": {
                "counts": plan.counts,
                "expected_top1": plan.expected_top1,
                "reembed_rows": plan.reembed_rows,
            },
            "index": index,
            "run_id": run_id,
        },
    )
    return {
        "rows": m["rows"],
        "rejected": m["rejected"],
        "shards": len(m["shards"]),
        "index": index,
    }


def validate_target(ctx: Context, plan: Plan) -> dict[str, Any]:
    """Keys, values, dimension and retrieval quality of the built version vs the plan."""
    import numpy as np

    from pipeline.graph.validate import (
        ValidationFailed,
        ValidationReport,
        check_keys_and_values,
        check_retrieval,
    )

    cfg, g = ctx.cfg, ctx.gallery
    target, source = cfg.target_version, plan.shards[0].source_version
    dim = int(g.manifest(target)["embedding_dim"])
    rep = ValidationReport(
        target,
        source,
        expected_top1=plan.expected_top1,
        transform_top1=plan.transform_top1,
        full_top1=plan.full_top1,
        tolerance=cfg.evaluate.min_top1_drop_tolerance,
    )
    check_keys_and_values(g, source, target, dim, rep, cfg.embed.min_distinct_fraction)
    val = steps.validation_labels(cfg)
    keys, labels = val["key"].to_pylist(), np.asarray(val["label"].to_pylist())
    gal, found = steps.version_rows(g, target, keys)
    qry, qfound = val_new_embeddings(ctx, keys)
    ok = found & qfound
    check_retrieval(rep, gal[ok], qry[ok], labels[ok], cfg.evaluate.metric)
    if not rep.ok:
        from io import StringIO

        buf = StringIO()
        Console(file=buf, width=140).print(rep.table())
        raise ValidationFailed(
            f"version {target!r} failed validation; CURRENT stays {g.current()!r}\n"
            + buf.getvalue()
        )
    return rep.to_dict()


def plan_of(output: dict[str, Any]) -> Plan:
    return Plan.from_json(json.dumps(output))


def upgrade_stages(
    ctx: Context, pid: Any, run: Any, console: Console, parent: Any = None
) -> list[Stage]:
    """The graph's nodes, in a topological order. `run()` is the running stage's MLflow run
    and `pid()` its id (runs a stage starts nest under it); `parent()` the upgrade's run."""
    cfg, quiet = ctx.cfg, ctx.quiet
    parent = parent or run

    def log_both(obj: dict[str, Any], name: str) -> None:
        for r in {id(x): x for x in (run(), parent())}.values():
            r.log_dict(obj, name)

    old, new = cfg.old_model, cfg.new_model

    def ingest(_: dict) -> dict[str, Any]:
        cur = ctx.gallery.current()
        if cur is not None:
            return {"source_version": cur, "ingested": False}
        v = steps.embed_version_step(ctx, old, "embed", pid(), cs.side_blob(ctx))
        steps.promote_step(ctx, old.name)
        return {"source_version": old.name, "ingested": True, **asdict(v)}

    def evaluate(_: dict) -> dict[str, Any]:
        report, files = cs.evaluate_compat_step(ctx, pid())
        return {"report": json.loads(report.to_json()), "files": files}

    def plan(inp: dict) -> dict[str, Any]:
        p, work = compute_plan(
            ctx, inp["ingest"]["source_version"], inp["evaluate"]["report"], quiet
        )
        console.print(p.table())
        for w in p.warnings:
            console.print(f"[yellow]warning:[/] {w}")
        log_both(json.loads(p.to_json()), "plan.json")
        return {**json.loads(p.to_json()), "_work": work}

    def execute(inp: dict) -> dict[str, Any]:
        out = inp["plan"]
        return execute_plan(ctx, plan_of(_strip(out)), out["_work"], run(), quiet)

    def index(inp: dict) -> dict[str, Any]:
        out = finalize_target(ctx, plan_of(_strip(inp["plan"])), parent().run_id)
        log_both(ctx.gallery.manifest(cfg.target_version), "manifest.json")
        return out

    def promote(_: dict) -> dict[str, Any]:
        return steps.promote_step(ctx, cfg.target_version)

    def opt(fn):
        return lambda _: asdict(r) if (r := fn()) is not None else None

    return [
        Stage("old-model", opt(lambda: steps.train_step(ctx, old, pid()))),
        Stage("side-info", opt(lambda: cs.train_side_info_step(ctx, pid()))),
        Stage("ingest", ingest, ("old-model", "side-info")),
        Stage("new-model", opt(lambda: steps.train_step(ctx, new, pid(), ("candidate",)))),
        Stage(
            "transformation",
            lambda _: cs.train_transformation_step(ctx, pid()),
            ("ingest", "new-model"),
        ),
        Stage("evaluate", evaluate, ("transformation",)),
        Stage("plan", plan, ("ingest", "evaluate")),
        Stage("execute", execute, ("plan",)),
        Stage("index", index, ("plan", "execute")),
        Stage(
            "validate",
            lambda i: validate_target(ctx, plan_of(_strip(i["plan"]))),
            ("plan", "index"),
        ),
        Stage("promote", promote, ("validate",)),
    ]


def _strip(plan_out: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in plan_out.items() if not k.startswith("_")}


def config_identity(cfg: Any) -> dict[str, Any]:
    """The config's IDENTITY_KEYS, flattened: what `_identity.json` records for a version."""
    from pipeline.config import dump_config
    from pipeline.tracking import flatten

    flat = flatten(dump_config(cfg))
    return {
        k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in IDENTITY_KEYS)
    }


def check_identity(ctx: Context, log: StageLog, restart: bool) -> None:
    """A rerun must be the same upgrade: refuse (or, with restart, discard) one begun with a
    different config, so a resumed version never mixes two plans."""
    from pipeline.io import uri as uri_io

    g, target = ctx.gallery, ctx.cfg.target_version
    ident = config_identity(ctx.cfg)
    rec = log.get("_identity")
    if restart and g.has_version(target) and g.current() == target:
        raise ConfigError(f"--restart: {target!r} is the serving version; roll back first")
    if restart:
        uri_io.delete(g.version_uri(target), g.storage)
        rec = None
    if rec is None:
        log.put("_identity", {"output": ident, "seconds": 0})
        return
    changed = sorted(
        k for k in set(ident) | set(rec["output"]) if ident.get(k) != rec["output"].get(k)
    )
    # Plan settings only bind once a plan is recorded: before that, changing them is fine.
    if log.get("plan") is None:
        changed = [k for k in changed if not k.startswith("plan.")]
    if changed:
        raise ConfigError(
            f"version {target!r} was started with a different config ({', '.join(changed[:6])}"
            f"{'…' if len(changed) > 6 else ''} changed): rerun with the same config, or "
            "--restart to discard it, or set plan.target_version"
        )
    log.put("_identity", {"output": ident, "seconds": 0})


# -- the plan replayed on the labelled validation rows ---------------------------------------
def val_new_embeddings(ctx: Context, keys: list[str]) -> tuple[Any, Any]:
    """New-model embeddings of the validation keys (computed once, cached in the workdir):
    the queries of both the plan's estimate and the validation check."""
    import hashlib

    import numpy as np

    blob = cs.blob_of(ctx, ctx.cfg.new_model)
    h = hashlib.sha256(
        json.dumps(
            [keys, blob.meta.get("config_hash") or blob.name, steps.image_shards(ctx.cfg)]
        ).encode()
    ).hexdigest()[:16]
    p = Path(ctx.cfg.workdir) / "cache" / f"val-{ctx.cfg.new_model.name}-{h}.npz"
    if p.exists():
        z = np.load(p)
        return z["emb"], z["found"]
    emb, found = cs._computed_new(ctx, "val", keys)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez(p, emb=emb, found=found)
    return emb, found


def _source_rows(g, source: str, keys: list[str]) -> dict[str, Any]:
    """Shard id, embedding and side-info of the given keys in the source version."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.embed.upgrade import _columns, _side_of
    from pipeline.gallery.store import arrow_to_embeddings
    from pipeline.io import uri as uri_io

    pos = {k: i for i, k in enumerate(keys)}
    want = pa.array(keys, pa.string())
    out: dict[str, Any] = {"shard": np.full(len(keys), -1, np.int64), "emb": None, "side": None}
    for rec in g.manifest(source)["shards"]:
        u = g.path("versions", source, rec["path"])
        for b in uri_io.iter_parquet_batches(u, g.storage, _columns(u, g.storage)):
            t = pa.Table.from_batches([b])
            t = t.filter(pc.is_in(t["key"], value_set=want))
            if not t.num_rows:
                continue
            idx = np.array([pos[k] for k in t["key"].to_pylist()])
            e = arrow_to_embeddings(t["embedding"])
            if out["emb"] is None:
                out["emb"] = np.zeros((len(keys), e.shape[1]), np.float32)
            out["emb"][idx], out["shard"][idx] = e, int(rec["shard_id"])
            side = _side_of(t.combine_chunks().to_batches()[0])
            if side is not None:
                if out["side"] is None:
                    out["side"] = np.zeros((len(keys), side.shape[1]), np.float32)
                out["side"][idx] = side
    return out


def _kept_rows(
    reembed_rows: int, names: list[str], ranks: dict[str, int], lv: Any, f: ShardFacts
) -> Any:
    """Which of a partial shard's validation rows keep their transformed embedding."""
    import numpy as np

    if ranks:  # exactly the rows the executor will re-embed: its order's prefix
        rank = np.array([ranks.get(k, -1) for k in names])
        return (rank < 0) | (rank >= reembed_rows)
    # approximate: the shard's uncertainty quantiles, or a random share without them
    frac = reembed_rows / max(f.rows - f.native_rows, 1)
    if lv is None or not f.uncertainty:
        return np.random.default_rng(0).random(len(names)) >= frac
    q = np.linspace(0, 1, max(len(f.uncertainty), 2))
    return lv < np.interp(1 - frac, q, f.uncertainty)


def simulate_plan(
    ctx: Context,
    plan: Plan,
    facts: list[ShardFacts],
    work: list[dict[str, Any]],
    chains: dict[str, ChainSpec],
) -> None:
    """Replay the plan on the labelled validation rows: each row takes the embedding the plan
    will give it (new, transformed or kept), queries are new-model embeddings. Sets the plan's
    expected, transform-only and full top-1 from it (the curve's figure is kept)."""
    import numpy as np

    from pipeline.embed.transform import TransformChain
    from pipeline.evaluate.metrics import retrieval_metrics

    cfg, g = ctx.cfg, ctx.gallery
    val = steps.validation_labels(cfg)
    keys, labels = val["key"].to_pylist(), np.asarray(val["label"].to_pylist())
    if len(keys) < 2:
        return
    new, found_new = val_new_embeddings(ctx, keys)
    src = _source_rows(g, plan.shards[0].source_version, keys)
    ok = found_new & (src["shard"] >= 0)
    if ok.sum() < 2:
        return
    keys_ok = np.flatnonzero(ok)
    keys_ok_names = [keys[i] for i in keys_ok]
    new, shard, labels = new[keys_ok], src["shard"][keys_ok], labels[keys_ok]
    old = src["emb"][keys_ok]
    side = src["side"][keys_ok] if src["side"] is not None else None
    built = {k: TransformChain(v) for k, v in chains.items()}
    by_work = {w["shard_id"]: w for w in work}
    by_fact = {f.shard_id: f for f in facts}
    trans, planned = new.copy(), new.copy()
    unreached: list[int] = []  # shards with validation rows no transformation reaches
    for sp in plan.shards:
        idx = np.flatnonzero(shard == sp.shard_id)
        chain = built.get(by_work[sp.shard_id].get("chain") or "")
        if len(idx) and chain is None:
            unreached.append(sp.shard_id)
        if not len(idx) or chain is None:
            continue  # no transformation: these rows are re-embedded in any plan
        s = side[idx] if side is not None and chain.spec.needs_side else None
        pred, lv = chain(old[idx], s)
        trans[idx] = pred
        if sp.method in ("transform", "skip"):
            planned[idx] = pred
        elif sp.method == "partial":
            names = [keys_ok_names[i] for i in idx]
            ranks = by_work[sp.shard_id].get("probe_ranks") or {}
            keep = _kept_rows(sp.reembed_rows, names, ranks, lv, by_fact[sp.shard_id])
            planned[idx[keep]] = pred[keep]

    def top1(gal: np.ndarray) -> float:
        m = retrieval_metrics(new, gal, labels, labels, cfg.evaluate.metric, exclude_self=True)
        return float(m["top1"])

    plan.curve_top1 = plan.expected_top1
    plan.expected_top1 = top1(planned)
    plan.full_top1 = top1(new)
    plan.estimate, plan.estimate_rows = "simulated", len(labels)
    if unreached:
        # Rows no h reaches would count as re-embedded, so "transform only" would be a mix:
        # keep the evaluation's figure (h on every validation row) and say so.
        plan.warnings.append(
            f"transform-only top-1 {plan.transform_top1:.2f} is the evaluation's: the "
            f"validation rows of shards {unreached} have no transformation to replay"
        )
    else:
        plan.transform_top1 = top1(trans)


def dry_run(ctx: Context, console: Console) -> Plan | None:
    """Print the graph's stages (done / pending) and the plan; write and train nothing."""
    from rich.table import Table

    g, target = ctx.gallery, ctx.cfg.target_version
    log = StageLog(g, target)
    t = Table(title=f"upgrade graph → {target} (dry run: nothing is executed)")
    for c in ("stage", "needs", "status", "seconds"):
        t.add_column(c)
    for s in upgrade_stages(ctx, lambda: None, lambda: None, console):
        rec = log.get(s.name)
        status = "[green]done[/]" if rec else "pending"
        t.add_row(s.name, ", ".join(s.needs), status, f"{rec['seconds']:.1f}" if rec else "")
    console.print(t)
    rec = log.get("plan")
    if rec is not None:
        plan = plan_of(_strip(rec["output"]))
        console.print(plan.table())
        return plan
    ingest = log.get("ingest")
    source = ingest["output"]["source_version"] if ingest else g.current()
    missing = []
    if source is None:
        missing.append("ingest (the gallery has no serving version)")
    if not (cs.transformation_dir(ctx) / "model.json").exists():
        missing.append("transformation")
    if not (cs.default_report_dir(ctx) / "report.json").exists():
        missing.append("evaluate")
    if missing:
        console.print(f"the plan needs these stages first: {', '.join(missing)}")
        return None
    plan, _ = compute_plan(ctx, source, load_report(ctx), ctx.quiet, train_missing=False)
    console.print(plan.table())
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    return plan


def plan_command(
    ctx: Context, source: str | None, out: str | Path | None, console: Console
) -> tuple[Plan, Path]:
    """`carryover plan`: facts + plan from the trained models and the evaluation report;
    prints the table, saves the JSON and logs it to an MLflow run."""
    g = ctx.gallery
    source = source or g.current()
    if source is None:
        raise FileNotFoundError(f"{g.uri}: no serving version to plan from; ingest first")
    if not (cs.transformation_dir(ctx) / "model.json").exists():
        raise FileNotFoundError(
            f"no trained transformation at {cs.transformation_dir(ctx)}: run "
            "`carryover upgrade --until evaluate` (or `carryover train --which transformation`)"
        )
    plan, _ = compute_plan(ctx, source, load_report(ctx), ctx.quiet)
    path = Path(out or Path(ctx.cfg.workdir) / "plans" / f"{ctx.cfg.target_version}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan.to_json())
    console.print(plan.table())
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    with ctx.tracker.run("plan", ctx.tags(step="plan", to_version=ctx.cfg.target_version)) as run:
        run.log_artifact(path)
        run.log_metrics(
            {
                "expected_top1": plan.expected_top1,
                "transform_top1": plan.transform_top1,
                "full_top1": plan.full_top1,
                "reembed_rows": plan.reembed_rows,
                **{f"shards_{k}": v for k, v in plan.counts.items()},
            }
        )
    return plan, path
