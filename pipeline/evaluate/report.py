"""Evaluation report of a compatibility study: cases, compatibility matrix, curves, plots."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from pipeline.evaluate.metrics import BackfillCurve, Metric, retrieval_metrics
from pipeline.evaluate.neighbours import neighbour_recall

_VALUES = ("top1", "top5", "map", "recall")
_CASE_FLOATS = ("top1", "top5", "map", "recall")
_LABELLED = ("top1", "top5", "map")  # NaN when the rows have no labels
_CURVE_KEYS = ("fractions", "top1", "map", "auc_top1", "auc_map")
_NAN = float("nan")


@dataclass
class CompatCase:
    """One retrieval case: queries from one embedding set against the gallery of another."""

    name: str
    query: str
    gallery: str
    top1: float
    top5: float
    map: float
    num_queries: int
    recall: float | None = None  # recall@k (percent) against the new model's own neighbours


def _rows(x: Any) -> int:
    return int(x.shape[0])


def _dim(x: Any) -> int:
    return int(x.shape[1])


def _check_sets(
    sets: Mapping[str, np.ndarray], labels: np.ndarray | None, names: Iterable[str]
) -> None:
    """Every named set exists, is 2-D and has one row per label (rows are the same images)."""
    n = len(labels) if labels is not None else _rows(next(iter(sets.values())))
    for name in names:
        if name not in sets:
            raise ValueError(f"no embedding set {name!r}; available: {sorted(sets)}")
        shape = tuple(sets[name].shape)
        if len(shape) != 2:
            raise ValueError(f"set {name!r}: expected a 2-D (rows, dim) array, got {shape}")
        if shape[0] != n:
            raise ValueError(f"set {name!r} has {shape[0]} rows but there are {n} labels")


def _pair_metrics(
    sets: Mapping[str, np.ndarray],
    labels: np.ndarray | None,
    pairs: Iterable[tuple[str, str]],
    metric: Metric,
    reference: np.ndarray | None = None,
) -> dict[tuple[str, str], dict[str, float]]:
    """Metrics of each distinct (query set, gallery set) pair, each computed once: top-1,
    top-5 and mAP where there are labels, recall@k where there are reference neighbours."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for q, g in pairs:
        if (q, g) in out:
            continue
        # Both sets embed the same rows in the same order: row i of each is one image.
        m = {"top1": _NAN, "top5": _NAN, "map": _NAN, "num_queries": float(_rows(sets[q]))}
        if labels is not None:
            m = retrieval_metrics(sets[q], sets[g], labels, labels, metric, (1, 5), True)
        m["recall"] = None
        if reference is not None:
            m["recall"] = neighbour_recall(sets[q], sets[g], reference, metric)
        out[(q, g)] = m
    return out


def _validate_cases(
    sets: Mapping[str, np.ndarray], labels: np.ndarray | None, cases: list[tuple[str, str, str]]
) -> None:
    for name, q, g in cases:
        for role, s in (("query", q), ("gallery", g)):
            if s not in sets:
                raise ValueError(
                    f"case {name!r}: {role} set {s!r} is missing; available: {sorted(sets)}"
                )
        if _rows(sets[q]) != _rows(sets[g]):
            raise ValueError(
                f"case {name!r}: query set {q!r} has {_rows(sets[q])} rows but gallery set "
                f"{g!r} has {_rows(sets[g])} (both must embed the same rows)"
            )
        _check_sets(sets, labels, (q, g))
        if _dim(sets[q]) != _dim(sets[g]):
            raise ValueError(
                f"case {name!r}: query set {q!r} has dim {_dim(sets[q])} but gallery set "
                f"{g!r} has dim {_dim(sets[g])}"
            )


def _cases_from(
    cases: list[tuple[str, str, str]], table: dict[tuple[str, str], dict[str, float]]
) -> list[CompatCase]:
    out = []
    for name, q, g in cases:
        m = table[(q, g)]
        nq = int(m["num_queries"])
        out.append(CompatCase(name, q, g, m["top1"], m["top5"], m["map"], nq, m["recall"]))
    return out


def evaluate_cases(
    sets: dict[str, np.ndarray],
    labels: np.ndarray,
    cases: list[tuple[str, str, str]],
    metric: Metric = "cosine",
) -> list[CompatCase]:
    """Top-1/top-5/mAP of each (case name, query set, gallery set), self-matches excluded.

    Every set holds embeddings of the same rows in the same order, labelled by `labels`.
    """
    _validate_cases(sets, labels, cases)
    table = _pair_metrics(sets, labels, [(q, g) for _, q, g in cases], metric)
    return _cases_from(cases, table)


def _compatible_pairs(sets: Mapping[str, np.ndarray]) -> list[tuple[str, str]]:
    names = list(sets)
    return [(a, b) for a in names for b in names if _dim(sets[a]) == _dim(sets[b])]


def _matrix_from(
    names: list[str], table: dict[tuple[str, str], dict[str, float]], value: str
) -> np.ndarray:
    m = np.full((len(names), len(names)), np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if (a, b) in table:
                m[i, j] = table[(a, b)][value]
    return m


def compatibility_matrix(
    sets: dict[str, np.ndarray],
    labels: np.ndarray,
    metric: Metric = "cosine",
    value: str = "top1",
) -> tuple[list[str], np.ndarray]:
    """M[i, j] = `value` of queries from set i against gallery set j (self excluded).

    NaN where the two sets' dims differ: those models cannot be compared by construction.
    """
    if value not in _VALUES:
        raise ValueError(f"value must be one of {_VALUES}, got {value!r}")
    names = list(sets)
    _check_sets(sets, labels, names)
    table = _pair_metrics(sets, labels, _compatible_pairs(sets), metric)
    return names, _matrix_from(names, table, value)


def _nan_to_none(x: Any) -> Any:
    """Recursively swap NaN/inf for None and numpy scalars/arrays for Python values."""
    if isinstance(x, np.ndarray):
        x = x.tolist()
    elif isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def _num(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _fmt(x: float | None) -> str:
    v = _num(x)
    return "—" if math.isnan(v) else f"{v:.2f}"


def curve_dict(curve: BackfillCurve) -> dict[str, Any]:
    """A backfilling curve in the shape `CompatReport.curves` stores."""
    return {k: getattr(curve, k) for k in _CURVE_KEYS}


@dataclass
class CompatReport:
    """Everything a compatibility study reports; serialisable to strict JSON."""

    title: str
    metric: str
    num_rows: int
    cases: list[CompatCase]
    matrix_names: list[str]
    matrix: list[list[float | None]]
    curves: dict[str, dict] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    matrix_value: str = "top1"
    recall_k: int = 0  # > 0: cases and curves carry recall@k against new/new's neighbours

    @property
    def labelled(self) -> bool:
        """The study had class labels (top-1 and mAP); else recall@k is its only measure."""
        return any(math.isfinite(_num(c.top1)) for c in self.cases)

    def add_curve(
        self, ordering: str, curve: BackfillCurve | None, recall: list[float] | None = None
    ) -> None:
        """Store a backfilling curve under its ordering name (e.g. "random", "uncertainty"):
        top-1/mAP where there are labels, recall@k where there are reference neighbours."""
        d = curve_dict(curve) if curve is not None else {}
        if recall is not None:
            n = len(recall) - 1
            d.setdefault("fractions", [i / n for i in range(n + 1)])
            d.update(recall=list(recall), auc_recall=float(np.mean(recall)))
        self.curves[ordering] = d

    def to_json(self) -> str:
        """Strict JSON: NaN and infinities become null."""
        return json.dumps(_nan_to_none(asdict(self)), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> CompatReport:
        """Inverse of `to_json`; null case metrics come back as NaN."""
        d = json.loads(text)
        cases = []
        for c in d.pop("cases"):
            c.update({k: _num(c.get(k)) for k in _LABELLED})
            cases.append(CompatCase(**c))
        return cls(cases=cases, **d)

    def case(self, name: str) -> CompatCase:
        """The case called `name`."""
        for c in self.cases:
            if c.name == name:
                return c
        raise ValueError(f"no case {name!r}; cases: {[c.name for c in self.cases]}")

    def gap_recovered(self, case: str, low: str = "old/old", high: str = "new/new") -> float:
        """Percent of the top-1 gap from `low` to `high` that `case` closes (NaN if no gap)."""
        lo, hi, mid = self.case(low).top1, self.case(high).top1, self.case(case).top1
        if hi == lo:
            return float("nan")
        return 100.0 * (mid - lo) / (hi - lo)

    def metrics(self) -> dict[str, float]:
        """Flat snake_case scalars for MLflow (`top1_new_old_bct`, `auc_top1_random`...)."""
        out: dict[str, float] = {}

        def put(key: str, v: float | None) -> None:
            if key in out:
                raise ValueError(f"two names sanitise to the same metric key {key!r}")
            if v is not None and math.isfinite(v):
                out[key] = float(v)

        for c in self.cases:
            for k in _CASE_FLOATS:
                put(f"{k}_{_slug(c.name)}", getattr(c, k))
        names = {c.name for c in self.cases}
        if {"old/old", "new/new"} <= names:
            for c in self.cases:
                if c.name not in ("old/old", "new/new"):
                    put(f"gap_recovered_{_slug(c.name)}", self.gap_recovered(c.name))
        for ordering, curve in self.curves.items():
            for k in ("auc_top1", "auc_map", "auc_recall"):
                put(f"{k}_{_slug(ordering)}", curve.get(k))
        return out

    def table(self) -> Table:
        """One row per case: top-1, top-5 and mAP in percent (labelled), recall@k."""
        t = Table(title=f"{self.title} ({self.metric}, {self.num_rows} rows)")
        t.add_column("case")
        t.add_column("queries → gallery")
        cols = [("top-1", "top1"), ("top-5", "top5"), ("mAP", "map")] if self.labelled else []
        if self.recall_k:
            cols.append((f"R@{self.recall_k}", "recall"))
        for title, _ in cols:
            t.add_column(title, justify="right")
        for c in self.cases:
            vals = [_fmt(getattr(c, key)) for _, key in cols]
            t.add_row(c.name, f"{c.query} → {c.gallery}", *vals)
        return t

    def curves_table(self) -> Table:
        """One row per backfilling ordering: its AUCs and the endpoints of its main measure."""
        t = Table(title="backfilling curves")
        t.add_column("ordering")
        key, name = ("top1", "top-1") if self.labelled else ("recall", f"R@{self.recall_k}")
        titles = {"auc_top1": "AUC top-1", "auc_map": "AUC mAP", "auc_recall": "AUC R@k"}
        aucs = [k for k in titles if self._has_curve_key(k)]
        for col in [titles[k] for k in aucs] + [f"{name} at 0%", f"{name} at 100%"]:
            t.add_column(col, justify="right")
        for name, c in self.curves.items():
            ys = c.get(key) or [None]
            t.add_row(name, *(_fmt(c.get(k)) for k in aucs), _fmt(ys[0]), _fmt(ys[-1]))
        return t

    def _has_curve_key(self, key: str) -> bool:
        return any(c.get(key) is not None for c in self.curves.values())


def build_report(
    title: str,
    sets: dict[str, np.ndarray],
    labels: np.ndarray | None,
    cases: list[tuple[str, str, str]],
    metric: Metric = "cosine",
    value: str | None = None,
    extra: dict | None = None,
    reference: np.ndarray | None = None,
) -> CompatReport:
    """Cases and the compatibility matrix of all `sets`, sharing one evaluation per pair.

    `labels` None: an unlabelled study, measured by recall@k against `reference` (the new
    model's own neighbours of each row). The matrix shows `value` (top-1, or recall without
    labels)."""
    value = value or ("top1" if labels is not None else "recall")
    if value not in _VALUES:
        raise ValueError(f"value must be one of {_VALUES}, got {value!r}")
    if labels is None and reference is None:
        raise ValueError("an unlabelled study needs reference neighbours (recall@k)")
    _validate_cases(sets, labels, cases)
    names = list(sets)
    _check_sets(sets, labels, names)
    pairs = [(q, g) for _, q, g in cases] + _compatible_pairs(sets)
    table = _pair_metrics(sets, labels, pairs, metric, reference)
    matrix = _matrix_from(names, table, value)
    return CompatReport(
        title=title,
        metric=metric,
        num_rows=_rows(sets[names[0]]),
        cases=_cases_from(cases, table),
        matrix_names=names,
        matrix=_nan_to_none(matrix),
        extra=dict(extra or {}),
        matrix_value=value,
        recall_k=int(reference.shape[1]) if reference is not None else 0,
    )


def _pyplot() -> Any:
    # start-up: matplotlib with pyplot costs ~0.5 s and only the chart needs it.
    import matplotlib

    # Headless workers (Ray, CI) have no display; set here so importing this module is inert.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up: as above, and only after use("Agg")

    return plt


def _plot_curves(report: CompatReport, path: Path) -> None:
    plt = _pyplot()
    panels = [("top1", "top-1 (%)"), ("map", "mAP (%)")] if report.labelled else []
    if report.recall_k:
        panels.append(("recall", f"recall@{report.recall_k} vs new/new (%)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    axes = list(axes[0])
    for name, c in report.curves.items():
        x = [100.0 * _num(f) for f in c["fractions"]]
        for ax, (key, _) in zip(axes, panels, strict=True):
            y = [_num(v) for v in c[key]]
            ax.plot(x, y, marker=".", label=f"{name} (AUC {_num(c.get('auc_' + key)):.2f})")
    for ax, (_, label) in zip(axes, panels, strict=True):
        ax.set_xlabel("gallery backfilled (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{report.title}: backfilling curves")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_matrix(report: CompatReport, path: Path) -> None:
    plt = _pyplot()
    names = report.matrix_names
    m = np.array([[_num(v) for v in row] for row in report.matrix], dtype=float)
    size = max(4.0, 1.1 * len(names) + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    finite = m[np.isfinite(m)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=lo, vmax=max(hi, lo + 1e-9))
    mid = (lo + hi) / 2
    for i in range(len(names)):
        for j in range(len(names)):
            v = m[i, j]
            text, color = ("—", "black") if math.isnan(v) else (f"{v:.1f}", "white")
            if not math.isnan(v) and v > mid:
                color = "black"  # viridis is light at the top: dark text stays readable
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("gallery set")
    ax.set_ylabel("query set")
    ax.set_title(f"{report.title}: {report.matrix_value} ({report.metric})")
    fig.colorbar(im, ax=ax, label=f"{report.matrix_value} (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_cases(report: CompatReport, path: Path) -> None:
    plt = _pyplot()
    names = [c.name for c in report.cases]
    key, label = ("top1", "top-1") if report.labelled else ("recall", f"recall@{report.recall_k}")
    vals = [_num(getattr(c, key)) for c in report.cases]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.5 * len(names) + 1.2)))
    bars = ax.barh(range(len(names)), vals, color="tab:blue")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()  # first case on top, as in the table
    ax.bar_label(bars, labels=[_fmt(v) for v in vals], padding=3, fontsize=9)
    ax.set_xlim(0, 105)
    ax.set_xlabel(f"{label} (%)")
    ax.set_title(f"{report.title}: {label} per case")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: CompatReport, out_dir: str | Path) -> dict[str, str]:
    """Write report.json and the plots that have data; returns file name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    path = out / "report.json"
    path.write_text(report.to_json())
    written[path.name] = str(path)
    plots = (
        ("backfill_curves.png", bool(report.curves), _plot_curves),
        ("compat_matrix.png", bool(report.matrix_names), _plot_matrix),
        ("cases.png", bool(report.cases), _plot_cases),
    )
    for name, has_data, plot in plots:
        if has_data:
            plot(report, out / name)
            written[name] = str(out / name)
    return written
