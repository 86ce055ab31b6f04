"""Benchmark (not a test): FCT's protocol on MNIST — old/old, new/new, BCT, FCT ± side-info,
FastFill, query adapters, backfilling AUC per ordering. Prints the table; writes report + plots.

    python jobs/benchmark_compat.py [--data ../shared/data/mnist10k.npz] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.config import TransformationConfig, load_config
from pipeline.services import compat_steps as cs
from pipeline.services import models, steps

HERE = Path(__file__).resolve().parent
# Published top-1 (ResNet50-128, old model on half the classes): DESIGN.md, "The science".
PAPER = {
    "old/old": ("34.2", "46.4"),
    "new/new": ("56.5", "68.4"),
    "new/fct": ("47.2", "61.8"),
    "new/fct-side": ("50.2", "65.1"),
}
VARIANTS = {"fct": ("fct", False), "fct-side": ("fct", True), "fastfill": ("fastfill", True)}


def main(data: str, config: str, overrides: list[str]) -> int:
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

    from pipeline.embed.features import collect, paired_features
    from pipeline.evaluate.report import write_report
    from pipeline.evaluate.study import StudyInputs, compat_study
    from pipeline.flows import ensure_images
    from pipeline.train.transformation import load_transformation

    timed("prepare images", ensure_images, cfg, data, 8)
    old, new = cfg.old_model, cfg.new_model
    bct = new.model_copy(update={"name": f"{new.name}-bct"}, deep=True)
    bct.train.loss = "bct"
    with ctx.tracker.run("benchmark-compat", ctx.tags(step="benchmark")) as parent:  # steps nest
        for m in (old, new):
            timed(f"train {m.name}", models.train_step, ctx, m)
        timed("train side-info", models.train_side_info_step, ctx)
        timed(f"train {bct.name} (BCT)", models.train_step, ctx, bct)
        transformations = {}
        for name, (loss, side) in VARIANTS.items():
            tc = cfg.transformation.model_dump()
            tc.update(name=name, loss=loss, side_info=side)
            vctx = steps.Context(
                cfg.model_copy(update={"transformation": TransformationConfig(**tc)})
            )
            timed(f"train transformation {name}", cs.train_transformation_step, vctx, ())
            transformations[name] = load_transformation(cs.transformation_dir(vctx))
        blobs = {m.name: models.blob_of(ctx, m) for m in (old, new, bct)}
        blobs["side"] = models.side_blob(ctx)
        val = timed(
            "features (val split)",
            lambda: collect(
                paired_features(cfg.images_uri, blobs, cfg.embed, cfg.storage, split="val")
            ),
        )
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
        inp = StudyInputs(
            labels=val["label"],
            sets={m: val[m] for m in (old.name, new.name, bct.name)},
            old=old.name,
            new=new.name,
            side=val["side"],
            transformations=transformations,
            adapters={k: v["adapter"] for k, v in fitted.items()},
            bct=[bct.name],
        )
        report = timed(
            "evaluate",
            compat_study,
            inp,
            "MNIST, FCT protocol",
            cfg.evaluate.metric,
            tuple(cfg.evaluate.orderings),
            cfg.evaluate.curve_steps,
            cfg.data.seed,
            "fastfill",
        )
        report.extra.update(timings=clock, seed=cfg.data.seed, data=data)
        files = write_report(report, Path(cfg.workdir) / "report")
        parent.log_metrics(report.metrics())
        for f in files.values():
            parent.log_artifact(f, "compat")
    console.print(report.table())
    console.print(report.curves_table())
    console.print(summary(report, bct.name))
    ok = checks(report, bct.name, console)
    console.print(f"timings (s): {clock}  total {sum(clock.values()):.0f}s")
    console.print(
        f"report + plots: {Path(cfg.workdir) / 'report'}  MLflow parent run: {parent.run_id}"
    )
    return 0 if ok else 1


def summary(report, bct: str) -> Table:
    t = Table(title="top-1 / mAP vs the papers (CIFAR-100 / ImageNet top-1)")
    for c in ("method", "case", "top-1", "mAP", "gap recovered %", "paper C100", "paper IN"):
        t.add_column(c, justify="left" if c in ("method", "case") else "right")
    rows = [
        ("old/old", "old/old"),
        ("new/new", "new/new"),
        ("BCT", f"{bct}/old (BCT)"),
        ("FCT, no side-info", "new/fct"),
        ("FCT + side-info", "new/fct-side"),
        ("FastFill (+ side-info)", "new/fastfill"),
    ]
    for label, case in rows:
        c = report.case(case)
        p = PAPER.get(case, ("—", "—"))
        gap = "" if case in ("old/old", "new/new") else f"{report.gap_recovered(case):.1f}"
        t.add_row(label, case, f"{c.top1:.2f}", f"{c.map:.2f}", gap, *p)
    return t


def checks(report, bct: str, console: Console) -> bool:
    """The acceptance criteria of the issue, as printed PASS/FAIL lines."""
    top1 = {c.name: c.top1 for c in report.cases}
    auc = {k: v["auc_top1"] for k, v in report.curves.items()}
    results = {
        "BCT new/old top-1 > old/old": top1[f"{bct}/old (BCT)"] > top1["old/old"],
        "FCT+side > FCT without side-info": top1["new/fct-side"] > top1["new/fct"],
        "FCT+side > BCT": top1["new/fct-side"] > top1[f"{bct}/old (BCT)"],
        "FCT+side recovers >= 90% of the gap": report.gap_recovered("new/fct-side") >= 90,
        "FastFill AUC uncertainty > random": auc.get("uncertainty", 0) > auc.get("random", 0),
    }
    for name, ok in results.items():
        console.print(f"{'[green]PASS' if ok else '[red]FAIL'}[/] {name}")
    return all(results.values())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared/data/mnist10k.npz"))
    ap.add_argument("--config", default=str(HERE / "configs/benchmark_compat.yaml"))
    ap.add_argument("--set", "-s", action="append", default=[], help="key=value override")
    args = ap.parse_args()
    if not Path(args.data).is_file():
        sys.exit(f"error: {args.data} not found (pass --data PATH.npz with images, labels)")
    raise SystemExit(main(args.data, args.config, args.set))
