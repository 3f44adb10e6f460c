"""The results of a sweep as a researcher reads them: one row per trial beside the paper's numbers.

* :func:`results_frame`: a pandas frame, one row per trial (settings, status, our metrics in
  percent, the paper's and the differences).
* :func:`format_table`: the Markdown table; :func:`plot_results`: AP against the swept value;
  :func:`summarize_seeds`: the mean over seeds per configuration.

No Ray and no MLflow here (the sweep, :mod:`pipeline.ablation.sweep`, writes and logs them).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.evaluation import METRIC_KEYS

from .plan import SweepPlan
from .space import display_value, field_kind


def results_frame(plan: SweepPlan, results: Mapping[int, Mapping[str, Any] | None]):
    """One row per trial: its settings, our metrics (percent), the paper's and the differences.

    ``results`` maps a trial index to its final metrics as the training reports them (COCO's
    0..1 scale; ``-1`` = undefined) plus optional ``status``/``error``/``iterations``; a trial
    missing from it (or ``None``) counts as not finished. Columns: ``trial``, ``label``, ``seed``,
    one per varied field (as text), ``status``, then ``AP``.., ``paper_AP``.., ``diff_AP``.. .
    """
    import pandas as pd

    records = []
    for trial in plan.trials:
        res = results.get(trial.index) or {}
        rec: dict[str, Any] = {"trial": trial.name, "label": trial.label, "seed": trial.seed}
        for name in plan.varied:
            rec[name] = display_value(name, getattr(trial.detector, name))
        rec["status"] = res.get("status", "done" if any(m in res for m in METRIC_KEYS) else "missing")
        rec["iterations"] = res.get("iterations")
        ours = {m: _percent(res.get(m)) for m in METRIC_KEYS}
        paper = {m: float(trial.paper[m]) if m in trial.paper else math.nan for m in METRIC_KEYS}
        rec.update(ours)
        rec.update({f"paper_{m}": paper[m] for m in METRIC_KEYS})
        rec.update({f"diff_{m}": ours[m] - paper[m] for m in METRIC_KEYS})  # NaN where either is missing
        rec["error"] = str(res.get("error") or "")
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    for col in ("iterations",):
        df[col] = pd.array(df[col], dtype="Int64")
    return df


def _percent(value: Any) -> float:
    """COCO 0..1 -> percent; -1 (no ground truth in that size range) and missing -> NaN."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    if not math.isfinite(v) or v < 0:
        return math.nan
    return 100.0 * v


def summarize_seeds(df):
    """Mean over seeds of every metric, one row per configuration label (same column layout),
    plus ``seeds`` (how many finished) and ``AP_std``."""
    import pandas as pd

    metric_cols = [c for c in df.columns if c.split("_", 1)[-1] in METRIC_KEYS or c in METRIC_KEYS]
    keep = [c for c in df.columns if c not in metric_cols and c not in ("trial", "seed", "status", "error",
                                                                       "iterations")]
    groups = []
    for label, g in df.groupby("label", sort=False):
        row = {c: g[c].iloc[0] for c in keep}
        row["seeds"] = int(g["AP"].notna().sum())
        for c in metric_cols:
            row[c] = g[c].mean()
        row["AP_std"] = g["AP"].std(ddof=1) if g["AP"].notna().sum() > 1 else math.nan
        groups.append(row)
    return pd.DataFrame.from_records(groups)


def _fmt(v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def format_table(plan: SweepPlan, df) -> str:
    """Markdown: three lines per configuration (ours, the paper's, ours - paper) and a column per metric."""
    # The label names the configuration (the paper's row name); the varied fields' values are
    # columns of the Parquet file.
    multi_seed = len(plan.seeds) > 1
    head = ["configuration", *(["seed"] if multi_seed else []), "", *METRIC_KEYS]
    lines = [f"### {plan.title}", ""]
    if plan.notes:
        lines += [f"_{plan.notes}_", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for _, r in df.iterrows():
        first = [str(r["label"]), *([str(r["seed"])] if multi_seed else [])]
        blank = [""] * len(first)
        status = "" if r["status"] in ("done",) else f" ({r['status']})"
        lines.append("| " + " | ".join(first + [f"ours{status}"] + [_fmt(r[m]) for m in METRIC_KEYS]) + " |")
        if any(not math.isnan(r[f"paper_{m}"]) for m in METRIC_KEYS):
            lines.append("| " + " | ".join(blank + [f"paper ({plan.split})"]
                                           + [_fmt(r[f"paper_{m}"]) for m in METRIC_KEYS]) + " |")
            lines.append("| " + " | ".join(blank + ["difference"]
                                           + [_fmt(r[f"diff_{m}"], signed=True) for m in METRIC_KEYS]) + " |")
    lines.append("")
    lines.append("AP in percent (COCO AP@[.50:.95]); '-' = not given by the paper, undefined "
                 "(no ground truth of that size) or not finished.")
    return "\n".join(lines) + "\n"


def plot_results(plan: SweepPlan, df, path: str | os.PathLike) -> Path:
    """PNG of AP (ours, and the paper's on a second axis) against the swept value.

    Numeric axes (k, anchor scale) are drawn as curves at their values; other tables put one
    tick per configuration in table order. Several seeds: the mean with a min-max band.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = plan.labels
    numeric = plan.axis in ("topk", "anchor_scale") or (
        plan.axis is not None and field_kind(plan.axis)[0] in (int, float) and not field_kind(plan.axis)[1])
    xs: list[float] = []
    for label in labels:
        trial = next(t for t in plan.trials if t.label == label)
        xs.append(float(getattr(trial.detector, plan.axis)) if numeric else float(len(xs)))
    ours = [df.loc[df["label"] == lab, "AP"] for lab in labels]
    mean = [s.mean() if s.notna().any() else math.nan for s in ours]
    lo = [s.min() if s.notna().any() else math.nan for s in ours]
    hi = [s.max() if s.notna().any() else math.nan for s in ours]
    paper = [df.loc[df["label"] == lab, "paper_AP"].iloc[0] for lab in labels]

    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 3), 4.2), dpi=110)
    ax.plot(xs, mean, "o-", color="tab:blue", label="ours")
    if len(plan.seeds) > 1:
        ax.fill_between(xs, lo, hi, color="tab:blue", alpha=0.2, label="ours (min-max over seeds)")
    ax.set_ylabel("AP, ours (%)", color="tab:blue")
    handles, names = ax.get_legend_handles_labels()
    if any(not math.isnan(p) for p in paper):
        ax2 = ax.twinx()
        ax2.plot(xs, paper, "s--", color="tab:orange", label=f"paper ({plan.split})")
        ax2.set_ylabel(f"AP, paper (%)", color="tab:orange")
        h2, n2 = ax2.get_legend_handles_labels()
        handles, names = handles + h2, names + n2
    if numeric:
        ax.set_xlabel(plan.axis)
        ax.set_xticks(xs)
        ax.set_xticklabels([display_value(plan.axis, type(getattr(plan.trials[0].detector, plan.axis))(x))
                            for x in xs])
    else:
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_title(plan.title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(handles, names, loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
