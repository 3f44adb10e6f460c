"""The results of a sweep as a researcher reads them: one row per trial beside the paper's numbers.

* :func:`results_frame`: a pandas frame, one row per trial (settings, status, our metrics in
  percent, the paper's and the differences).
* :func:`format_table`: the Markdown table; :func:`plot_results`: AP against the swept value;
  :func:`summarize_seeds`: the mean over seeds per configuration.
* :func:`table_claim`: whether the paper's claim for the table holds in our rows, paired by seed
  (:mod:`pipeline.verdict`).

What a table can honestly say: with several seeds a row is the mean ± sd over its seeds, and the
claim's verdict says whether it holds in every seed, on the mean only, or not at all; with one
seed it cannot tell (the seed spread of these models is 1.5-5.5 AP, ``bench/accuracy.py``). The
paper's numbers stay beside ours, but a "difference" row only appears on COCO data: the paper's
COCO AP minus AP on synthetic shapes measures nothing. The footer names the environment the
numbers come from (:mod:`pipeline.environment`).

No Ray and no MLflow here (the sweep, :mod:`pipeline.ablation.sweep`, writes and logs them).
"""
from __future__ import annotations

import math
import os
import re
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.environment import Environment, environment_footer
from pipeline.evaluation import METRIC_KEYS
from pipeline.tracking import save_figure
from pipeline.verdict import CLAIM_TABLES, Judgement, Verdict, judge, paper_claim

from .plan import SweepPlan
from .space import display_value, field_kind

# A "files" source is COCO when its annotation files carry COCO's names (instances_val2017.json, ...).
_COCO_ANN = re.compile(r"instances_[a-z-]+\d*\.json$")


def results_frame(plan: SweepPlan, results: Mapping[int, Mapping[str, Any] | None]):
    """One row per trial: its settings, our metrics (percent), the paper's and the differences.

    ``results`` maps a trial index to its final metrics as the training reports them (COCO's
    0..1 scale; ``-1`` = undefined) plus optional ``status``/``error``/``iterations`` and
    ``environment`` (the key of the trial's :class:`~pipeline.environment.Environment`); a trial
    missing from it (or ``None``) counts as not finished. Columns: ``trial``, ``label``, ``seed``,
    one per varied field (as text), ``status``, then ``AP``.., ``paper_AP``.., ``diff_AP``.. and
    ``environment``.
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
        rec["environment"] = str(res.get("environment") or "")
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
                                                                       "iterations", "environment")]
    groups = []
    for label, g in df.groupby("label", sort=False):
        row = {c: g[c].iloc[0] for c in keep}
        row["seeds"] = int(g["AP"].notna().sum())
        for c in metric_cols:
            row[c] = g[c].mean()
        row["AP_std"] = g["AP"].std(ddof=1) if g["AP"].notna().sum() > 1 else math.nan
        groups.append(row)
    return pd.DataFrame.from_records(groups)


def coco_data(plan: SweepPlan) -> bool:
    """Whether every trial trains and evaluates on COCO (a ``coco:`` root, or files with COCO's
    annotation names): only then is ours minus the paper's a difference worth printing."""
    def is_coco(data) -> bool:
        if data.source.startswith("coco:"):
            return True
        return data.source == "files" and bool(data.val_ann) and bool(_COCO_ANN.search(str(data.val_ann)))

    return bool(plan.trials) and all(is_coco(t.train.data) for t in plan.trials)


@dataclass(frozen=True)
class ClaimRow:
    """A planned configuration as :func:`pipeline.verdict.paper_claim` reads a table row: its label,
    its resolved detector fields (``topk``, ``assigner``, ...) and the paper's numbers."""

    label: str
    overrides: Mapping[str, Any]
    paper: Mapping[str, float]
    value: Any = None


def table_claim(plan: SweepPlan, df) -> Optional[Judgement]:
    """The paper's claim for the plan's table judged on the finished trials, paired by seed
    (:func:`pipeline.verdict.judge`); None where the paper makes no claim we test about it, or
    too few of the claim's rows were planned. All-zero AP (a smoke run) cannot tell."""
    rows, seen = [], set()
    for trial in plan.trials:
        if trial.label not in seen:
            seen.add(trial.label)
            rows.append(ClaimRow(trial.label, trial.detector.to_dict(), dict(trial.paper)))
    claim = paper_claim(plan.table, rows)
    if claim is None:
        return None
    ap_by_seed: dict[int, dict[str, float]] = {}
    for _, r in df.iterrows():
        if r["status"] == "done" and not math.isnan(r["AP"]):
            ap_by_seed.setdefault(int(r["seed"]), {})[str(r["label"])] = float(r["AP"])
    scores = [ap for seed in ap_by_seed.values() for label, ap in seed.items() if label in claim.test.rows]
    if scores and not any(scores):
        # models that detect nothing are "flat" in anything: no evidence either way
        return Judgement(claim, Verdict.CANNOT_TELL, tuple(sorted(ap_by_seed)), (), None,
                         note="every AP is 0: the models detect nothing yet (train longer)")
    return judge(claim, ap_by_seed)


def claim_text(plan: SweepPlan, df) -> str:
    """The line under the table that says what it can tell about the paper's claim."""
    judgement = table_claim(plan, df)
    if judgement is not None:
        return f"**The paper's claim**: {judgement.text()}."
    if plan.table in CLAIM_TABLES:
        return "**The paper's claim** for this table needs more of its rows than ran here: cannot tell."
    spread = "; differences within the seed spread (1.5-5.5 AP for the tiny presets, bench/accuracy.py) are noise"
    return (f"**The paper's claim**: none is tested for this table{spread}"
            + ("." if len(plan.seeds) > 1 else ", and with one seed the table cannot tell them apart."))


def _fmt(v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def _mean_sd(values) -> str:
    """``29.6 ± 1.2`` over the finite values (one value: no sd; none: ``-``)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def format_table(plan: SweepPlan, df, environments: Optional[Iterable[Environment]] = None) -> str:
    """Markdown: per configuration our line (one seed: its numbers; several: mean ± sd over the
    seeds, and each seed's AP), the paper's and, on COCO only, ours - paper; a column per metric.
    Under it: the verdict on the paper's claim for the table, what the numbers are, and the
    ``environments`` the trials ran in (:func:`pipeline.environment.environment_footer`)."""
    # The label names the configuration (the paper's row name); the varied fields' values are
    # columns of the Parquet file.
    multi_seed = len(plan.seeds) > 1
    coco = coco_data(plan)
    head = ["configuration", "", *METRIC_KEYS, *(["AP per seed"] if multi_seed else [])]
    lines = [f"### {plan.title}", ""]
    if plan.notes:
        lines += [f"_{plan.notes}_", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for label, g in df.groupby("label", sort=False):
        r = g.iloc[0]
        done = g[g["status"] == "done"]
        if multi_seed:
            others = [s for s in g["status"] if s != "done"]
            status = f" ({len(done)}/{len(g)} seeds: {', '.join(unique_text(others))})" if others else ""
            ours = [_mean_sd(done[m]) for m in METRIC_KEYS]
            per_seed = " / ".join(f"{_fmt(ap)}" for ap in g["AP"])
            first = f"ours, mean ± sd{status}" if len(done) > 1 else f"ours{status}"
            lines.append("| " + " | ".join([str(label), first, *ours, per_seed]) + " |")
        else:
            status = "" if r["status"] == "done" else f" ({r['status']})"
            lines.append("| " + " | ".join([str(label), f"ours{status}", *[_fmt(r[m]) for m in METRIC_KEYS]]) + " |")
        tail = [""] if multi_seed else []
        if any(not math.isnan(r[f"paper_{m}"]) for m in METRIC_KEYS):
            lines.append("| " + " | ".join(["", f"paper ({plan.split})", *[_fmt(r[f"paper_{m}"]) for m in METRIC_KEYS],
                                            *tail]) + " |")
            if coco:
                mean = {m: done[m].mean() if len(done) else math.nan for m in METRIC_KEYS}
                lines.append("| " + " | ".join(["", "difference", *[_fmt(mean[m] - r[f"paper_{m}"], signed=True)
                                                                    for m in METRIC_KEYS], *tail]) + " |")
    lines += ["", claim_text(plan, df), ""]
    what = "AP in percent (COCO AP@[.50:.95]); '-' = not given by the paper, undefined (no ground truth of that size) or not finished."
    if multi_seed:
        what += f" Ours: mean ± sample sd over seeds {', '.join(map(str, plan.seeds))} (finished trials only)."
    if not coco:
        data = sorted({t.train.data.source.split(':')[0] for t in plan.trials})
        what += (f" The paper's numbers are on COCO {plan.split}, ours on {' and '.join(data)} data: no difference "
                 "row, compare trends only.")
    lines += [what, "", environment_footer(environments or ())]
    return "\n".join(lines) + "\n"


def unique_text(values) -> list[str]:
    """Distinct values in first-seen order, each with its count when repeated (``error x2``)."""
    counts: dict[str, int] = {}
    for v in values:
        counts[str(v)] = counts.get(str(v), 0) + 1
    return [f"{v} x{n}" if n > 1 else v for v, n in counts.items()]


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
    return save_figure(fig, path)
