"""Benchmark (not a test): FCT's protocol on MNIST — old/old, new/new, BCT, FCT ± side-info,
FastFill, query adapters, BT², d-Simplex, OCA, backfilling AUC per ordering. Prints the table;
writes report + plots.

    python jobs/benchmark_compat.py [--data ../shared/data/mnist10k.npz] [--set key=value ...]
    python jobs/benchmark_compat.py --only bt2,dsimplex,oca   # old, new and those rows only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.config import TransformationConfig, load_config
from pipeline.embed.features import collect, paired_features
from pipeline.evaluate.report import write_report
from pipeline.evaluate.study import StudyInputs, compat_study
from pipeline.services import compat_steps as cs
from pipeline.services import models, steps
from pipeline.train.transformation import load_transformation

HERE = Path(__file__).resolve().parent
# Published top-1 (ResNet50-128, old model on half the classes): DESIGN.md, "The science".
PAPER = {
    "old/old": ("34.2", "46.4"),
    "new/new": ("56.5", "68.4"),
    "new/fct": ("47.2", "61.8"),
    "new/fct-side": ("50.2", "65.1"),
}
VARIANTS = {"fct": ("fct", False), "fct-side": ("fct", True), "fastfill": ("fastfill", True)}
NEW_ROWS = ("bt2", "dsimplex", "oca")
EXTRA_DIMS = 32  # BT² / OCA: dims added to the old model's
LABELS = {"bt2": "BT²", "dsimplex": "d-Simplex", "oca": "OCA"}


def row_models(old, new) -> dict[str, list]:
    """The models each new row trains: BT² and OCA a wider new model; d-Simplex a pair of old
    and new models on the same fixed simplex (K-1 dims), the old one on the old classes."""

    def copy(m, loss: str, dim: int):
        c = m.model_copy(update={"name": f"{m.name}-{loss}"}, deep=True)
        c.train.loss = loss
        c.architecture.embedding_dim = dim
        return c

    wide, k = old.architecture.embedding_dim + EXTRA_DIMS, new.architecture.num_classes
    return {
        "bt2": [copy(new, "bt2", wide)],
        "oca": [copy(new, "oca", wide)],
        "dsimplex": [copy(old, "dsimplex", k - 1), copy(new, "dsimplex", k - 1)],
    }


def row_cases(row: str, ms: list, old: str, sets: dict | None = None) -> list[tuple]:
    """(case, query set, gallery set) of a new row; BT² / OCA compare their first d_old dims
    to old rows (added to `sets` as NAME[:d_old]) and their whole vector to their own rows."""
    if row == "dsimplex":
        o, n = ms[0].name, ms[1].name
        return [(f"{n}/{o} (d-Simplex)", n, o), (f"{o}/{o}", o, o), (f"{n}/{n}", n, n)]
    n, d_old = ms[0].name, ms[0].architecture.embedding_dim - EXTRA_DIMS
    if sets is not None:
        sets[f"{n}[:{d_old}]"] = sets[n][:, :d_old]
    return [(f"{n}/old ({LABELS[row]})", f"{n}[:{d_old}]", old), (f"{n}/{n}", n, n)]


def main(data: str, config: str, overrides: list[str], only: tuple[str, ...] | None) -> int:
    console = Console(width=None if sys.stdout.isatty() else 140)
    cfg = load_config(config, overrides)
    ctx = steps.Context(cfg, quiet=True)
    clock: dict[str, float] = {}

    def timed(name, fn, *a):
        t0 = time.perf_counter()
        console.print(f"[bold cyan]▶ {name}[/]")
        out = fn(*a)
        clock[name] = round(time.perf_counter() - t0, 1)
        return out

    from pipeline.flows import ensure_images

    timed("prepare images", ensure_images, cfg, data, 8)
    old, new = cfg.old_model, cfg.new_model
    bct = new.model_copy(update={"name": f"{new.name}-bct"}, deep=True)
    bct.train.loss = "bct"
    rows = {r: ms for r, ms in row_models(old, new).items() if r in (only or NEW_ROWS)}
    with ctx.tracker.run("benchmark-compat", ctx.tags(step="benchmark")) as parent:  # steps nest
        for m in (old, new):
            timed(f"train {m.name}", models.train_step, ctx, m)
        trained = {"bct": bct} if only is None else {}
        transformations = train_baselines(ctx, timed, bct) if only is None else {}
        for row, ms in rows.items():
            for m in ms:
                timed(f"train {m.name} ({LABELS[row]})", models.train_step, ctx, m)
                trained[m.name] = m
        report = evaluate(ctx, timed, list(trained.values()), transformations, rows, only)
        report.extra.update(timings=clock, seed=cfg.data.seed, data=data)
        files = write_report(report, Path(cfg.workdir) / "report")
        parent.log_metrics(report.metrics())
        for f in files.values():
            parent.log_artifact(f, "compat")
    console.print(report.table())
    if only is None:
        console.print(report.curves_table())
    console.print(summary(report, bct.name, rows))
    ok = checks(report, bct.name, rows, console, only is None)
    console.print(f"timings (s): {clock}  total {sum(clock.values()):.0f}s")
    console.print(
        f"report + plots: {Path(cfg.workdir) / 'report'}  MLflow parent run: {parent.run_id}"
    )
    return 0 if ok else 1


def train_baselines(ctx, timed, bct) -> dict:
    """Side-info, BCT and the three transformations h; h by name (module, meta)."""
    cfg = ctx.cfg
    timed("train side-info", models.train_side_info_step, ctx)
    timed(f"train {bct.name} (BCT)", models.train_step, ctx, bct)
    transformations = {}
    for name, (loss, side) in VARIANTS.items():
        tc = cfg.transformation.model_dump()
        tc.update(name=name, loss=loss, side_info=side)
        vctx = steps.Context(cfg.model_copy(update={"transformation": TransformationConfig(**tc)}))
        timed(f"train transformation {name}", cs.train_transformation_step, vctx, ())
        transformations[name] = load_transformation(cs.transformation_dir(vctx))
    return transformations


def evaluate(ctx, timed, extra_models, transformations, rows, only):
    """Features of the validation split under every model, the adapters (full run) and the
    study: FCT's cases, BCT's, and each new row's."""
    cfg, old, new = ctx.cfg, ctx.cfg.old_model, ctx.cfg.new_model
    blobs = {m.name: models.blob_of(ctx, m) for m in (old, new, *extra_models)}
    if only is None:
        blobs["side"] = models.side_blob(ctx)
    val = timed(
        "features (val split)",
        lambda: collect(
            paired_features(cfg.images_uri, blobs, cfg.embed, cfg.storage, split="val")
        ),
    )
    adapters = {}
    if only is None:
        pair = {k: blobs[k] for k in (old.name, new.name)}
        train = timed(
            "features (train split)",
            lambda: collect(
                paired_features(cfg.images_uri, pair, cfg.embed, cfg.storage, split="train")
            ),
        )
        fitted = timed(
            "fit query adapters", cs.fit_adapters_step, ctx, train[new.name], train[old.name], True
        )
        adapters = {k: v["adapter"] for k, v in fitted.items()}
    sets = {m: val[m] for m in blobs if m != "side"}
    extra = [c for row, ms in rows.items() for c in row_cases(row, ms, old.name, sets)]
    inp = StudyInputs(
        labels=val["label"],
        sets=sets,
        old=old.name,
        new=new.name,
        side=val.get("side"),
        transformations=transformations,
        adapters=adapters,
        bct=[f"{new.name}-bct"] if only is None else [],
        extra_cases=extra,
    )
    return timed(
        "evaluate",
        compat_study,
        inp,
        "MNIST, FCT protocol",
        cfg.evaluate.metric,
        tuple(cfg.evaluate.orderings),
        cfg.evaluate.curve_steps,
        cfg.data.seed,
        "fastfill" if only is None else None,
    )


def summary(report, bct: str, rows: dict) -> Table:
    t = Table(title="top-1 / mAP vs the papers (CIFAR-100 / ImageNet top-1)")
    for c in ("method", "case", "top-1", "top-5", "mAP", "gap recovered %", "paper C100"):
        t.add_column(c, justify="left" if c in ("method", "case") else "right")
    t.add_column("paper IN", justify="right")
    names = {c.name for c in report.cases}
    lines = [
        ("old/old", "old/old"),
        ("new/new", "new/new"),
        ("BCT", f"{bct}/old (BCT)"),
        ("FCT, no side-info", "new/fct"),
        ("FCT + side-info", "new/fct-side"),
        ("FastFill (+ side-info)", "new/fastfill"),
    ]
    for row, ms in rows.items():
        lines += [(f"{LABELS[row]} {c.split(' ')[0]}", c) for c, _, _ in row_cases(row, ms, "")]
    for label, case in lines:
        if case not in names:
            continue  # --only: the baselines' rows were not trained
        c = report.case(case)
        p = PAPER.get(case, ("—", "—"))
        gap = "" if case in ("old/old", "new/new") else f"{report.gap_recovered(case):.1f}"
        t.add_row(label, case, f"{c.top1:.2f}", f"{c.top5:.2f}", f"{c.map:.2f}", gap, *p)
    return t


def checks(report, bct: str, rows: dict, console: Console, full: bool) -> bool:
    """The acceptance criteria of the issue, as printed PASS/FAIL lines."""
    top1 = {c.name: c.top1 for c in report.cases}
    auc = {k: v["auc_top1"] for k, v in report.curves.items()}
    results = {}
    if full:
        results = {
            "BCT new/old top-1 > old/old": top1[f"{bct}/old (BCT)"] > top1["old/old"],
            "FCT+side > FCT without side-info": top1["new/fct-side"] > top1["new/fct"],
            "FCT+side > BCT": top1["new/fct-side"] > top1[f"{bct}/old (BCT)"],
            "FCT+side recovers >= 90% of the gap": report.gap_recovered("new/fct-side") >= 90,
            "FastFill AUC uncertainty > random": auc.get("uncertainty", 0) > auc.get("random", 0),
        }
    for row, ms in rows.items():  # compatible at all: far above independent new vs old
        case = row_cases(row, ms, "")[0][0]
        results[f"{LABELS[row]} new/old top-1 > independent new/old"] = top1[case] > top1["new/old"]
    for name, ok in results.items():
        console.print(f"{'[green]PASS' if ok else '[red]FAIL'}[/] {name}")
    return all(results.values())


def parse_only(value: str) -> tuple[str, ...]:
    """--only's comma-separated rows, each one of NEW_ROWS."""
    picked = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in picked if v not in NEW_ROWS]
    if bad or not picked:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(NEW_ROWS)}, got {value!r}")
    return picked


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared/data/mnist10k.npz"))
    ap.add_argument("--config", default=str(HERE / "configs/benchmark_compat.yaml"))
    ap.add_argument("--set", "-s", action="append", default=[], help="key=value override")
    ap.add_argument(
        "--only",
        type=parse_only,
        default=None,
        help=f"train and evaluate only these new rows (some of {','.join(NEW_ROWS)}) beside "
        "old and new; skips side-info, BCT, FCT, FastFill and the adapters (development)",
    )
    args = ap.parse_args()
    if not Path(args.data).is_file():
        sys.exit(f"error: {args.data} not found (pass --data PATH.npz with images, labels)")
    raise SystemExit(main(args.data, args.config, args.set, args.only))
