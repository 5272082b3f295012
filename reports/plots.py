"""Pareto plots (static PNG for MLflow's image view, interactive self-contained HTML) and the
hypervolume-over-trials plot.

Conventions:

* The scatter plots the first objective on the **y** axis and the second on the **x** axis (sweeps list the
  quality metric first: accuracy vs throughput / params / memory). A third objective, if any, is the
  colour. With a single objective, x is the trial index.
* Plotted points are the *ranked* trials (completed, finite objectives). The rank-0 points (under all
  objectives) are highlighted; the step line is the attainment boundary of the 2-D front of the two plotted
  objectives (identical to the rank-0 set when there are exactly two objectives).
* Baseline arms (tag ``baseline``: transformer / deltanet) get their own markers and legend entries.
* Matplotlib is used through ``matplotlib.figure.Figure`` (Agg canvas) — no pyplot, no global backend.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from hqlt.search_space.labels import decode_arm, format_metric
from hqlt.search_space.vocabulary import (ALL_GROUP, COMPLETED, PROBE_CONTENDED, PROBE_DEVICE_TAG, PROBE_SEQ_LEN,
                                          PROBE_SIZE_TAG)

from .objectives import Objective, axis_label, is_accuracy_like, metric_label
from .pareto import non_dominated_sort
from .tables import status_counts

__all__ = ["pareto_png", "pareto_html", "hypervolume_png", "probe_note", "staircase", "BASELINE_STYLES"]

# baseline name -> (legend label, matplotlib marker, plotly symbol, colour)
BASELINE_STYLES = {
    "transformer": ("Transformer baseline", "*", "star", "#d62728"),
    "deltanet": ("DeltaNet baseline", "D", "diamond", "#1f77b4"),
}
_OTHER_BASELINE = ("baseline", "P", "cross", "#9467bd")
FRONT_COLOUR = "#ff7f0e"
MAX_LABELS = 40  # label every point up to this many, else only the front and the baselines


def _baseline_style(name: str) -> tuple[str, str, str, str]:
    if name in BASELINE_STYLES:
        return BASELINE_STYLES[name]
    label, mk, sym, col = _OTHER_BASELINE
    return (f"{name} baseline", mk, sym, col)


def _plotted(trials: pd.DataFrame) -> pd.DataFrame:
    if "pareto_rank" not in trials.columns:
        raise ValueError("trials need a 'pareto_rank' column (see hqlt.reports.report.rank_trials)")
    return trials[trials["pareto_rank"].notna()].copy()


def staircase(xs: Sequence[float], ys: Sequence[float], x_mode: str, y_mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the attainment boundary through the 2-D non-dominated points ``(xs, ys)``.

    Between consecutive front points the line takes the *inner* corner, so the area under/behind the line
    is exactly the region the front dominates.
    """
    sx = 1.0 if x_mode == "max" else -1.0
    sy = 1.0 if y_mode == "max" else -1.0
    pts = np.unique(np.column_stack([np.asarray(xs, float) * sx, np.asarray(ys, float) * sy]), axis=0)
    if pts.shape[0] == 0:
        return np.zeros(0), np.zeros(0)
    order = np.lexsort((-pts[:, 1], pts[:, 0]))  # oriented x ascending (y then descending)
    pts = pts[order]
    vx, vy = [pts[0, 0]], [pts[0, 1]]
    for (x0, _), (x1, y1) in zip(pts[:-1], pts[1:]):
        vx += [x0, x1]
        vy += [y1, y1]
    return np.array(vx) * sx, np.array(vy) * sy


def _counts_line(trials: pd.DataFrame) -> str:
    counts = status_counts(trials)
    n_ranked = int(trials["pareto_rank"].notna().sum()) if "pareto_rank" in trials.columns else 0
    rest = ", ".join(f"{c} {s}" for s, c in counts.items() if s != COMPLETED)
    line = f"{n_ranked} ranked of {len(trials)} trials"
    return f"{line} ({rest})" if rest else line


def probe_note(trials: pd.DataFrame) -> str:
    """How the trials' `perf/*` values were measured, from their logged probe tags and metrics:
    "probe 340M, T=2048, NVIDIA H200" (several values are all listed; "own size": each trial's own model), with
    "N of M contended" when some were not measured with the card to themselves (CPU, shared GPU)."""
    parts = []
    for col, fmt in ((f"tags.{PROBE_SIZE_TAG}", "{}"), (f"metrics.{PROBE_SEQ_LEN}", "T={:.0f}"),
                     (f"tags.{PROBE_DEVICE_TAG}", "{}")):
        if col in trials.columns:
            values = sorted({fmt.format(v) for v in trials[col].dropna() if v != ""})
            if values:
                parts.append(" / ".join("own size" if v == "own" else v for v in values))
    if not parts:
        return ""
    note = "probe " + ", ".join(parts)
    col = f"metrics.{PROBE_CONTENDED}"
    if col in trials.columns:
        flags = trials[col].dropna()
        n = int((flags > 0).sum())
        if n:
            note += " (contended)" if n == len(flags) else f" ({n} of {len(flags)} contended)"
    return note


def _label(obj: Objective, trials: pd.DataFrame, newline: str = "\n") -> str:
    """`axis_label`, and for a throughput / cost axis (`perf/*`) the probe it was measured with."""
    note = probe_note(trials) if obj.metric.startswith("perf/") else ""
    return axis_label(obj) + (newline + note if note else "")


def _use_log(values: np.ndarray, metric: str) -> bool:
    v = values[np.isfinite(values)]
    return bool(len(v) >= 2 and not is_accuracy_like(metric) and v.min() > 0 and v.max() / v.min() > 50)


def _xy(trials: pd.DataFrame, objectives: Sequence[Objective]) -> tuple[np.ndarray, np.ndarray, Objective | None, Objective]:
    y_obj = objectives[0]
    y = trials[f"metrics.{y_obj.metric}"].to_numpy(float)
    if len(objectives) >= 2:
        x_obj: Objective | None = objectives[1]
        x = trials[f"metrics.{x_obj.metric}"].to_numpy(float)
    else:
        x_obj = None
        x = np.arange(1, len(trials) + 1, dtype=float)
    return x, y, x_obj, y_obj


def _labels_at(x: np.ndarray, y: np.ndarray, labels: Sequence[str]) -> list[tuple[float, float, str]]:
    """Merge labels of points at the same position ("A, B"; repeats as "A ×2", e.g. seeds of one config)."""
    merged: dict[tuple[float, float], dict[str, int]] = {}
    for xi, yi, lab in zip(x, y, labels):
        counts = merged.setdefault((float(xi), float(yi)), {})
        if lab:
            counts[lab] = counts.get(lab, 0) + 1
    return [
        (k[0], k[1], ", ".join(lab if c == 1 else f"{lab} ×{c}" for lab, c in v.items()))
        for k, v in merged.items()
        if v
    ]


def _groups(pts: pd.DataFrame) -> list[str]:
    """The group labels to draw one panel each for (fronts per task); [""] when all trials are one group."""
    if "group" not in pts.columns or not (pts["group"].dropna() != ALL_GROUP).any():
        return [""]
    return sorted(pts["group"].dropna().astype(str).unique().tolist())


def _spread_labels(ax, points: list[tuple[float, float, str]]) -> None:
    """Annotate points, alternating the offsets of neighbours (sorted along x) so nearby labels do not overlap."""
    offsets = ((6, 6), (6, -14), (-6, 12), (-6, -20))
    for k, (lx, ly, text) in enumerate(sorted(points, key=lambda p: (p[0], p[1]))):
        dx, dy = offsets[k % len(offsets)]
        ax.annotate(text, (lx, ly), xytext=(dx, dy), textcoords="offset points", fontsize=7.5, zorder=6,
                    ha="left" if dx > 0 else "right",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.75))


def pareto_png(
    trials: pd.DataFrame,
    objectives: Sequence[Objective],
    path: str | Path,
    *,
    title: str | None = None,
    dpi: int = 130,
) -> Path:
    """Write the static Pareto scatter (see module doc) to ``path`` and return it: one panel per group (task)."""
    from matplotlib.figure import Figure

    path = Path(path)
    pts_all = _plotted(trials)
    groups = _groups(pts_all)
    n = len(groups)
    ncols = min(n, 2)
    nrows = (n + ncols - 1) // ncols
    fig = Figure(figsize=(9.5 if n == 1 else 7.0 * ncols, 6.5 if n == 1 else 5.4 * nrows), layout="constrained")
    for k, group in enumerate(groups):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        pts = pts_all if not group else pts_all[pts_all["group"].astype(str) == group]
        sub = trials if not group else trials[trials["group"].astype(str) == group]
        _draw_panel(fig, ax, pts, objectives, legend=k == 0)
        ax.set_title((f"{group}: " if group else "") + _counts_line(sub), fontsize=9 if not group else 10,
                     color="0.3" if not group else "0.1")
    name = title or "sweep"
    fig.suptitle(f"{name} — Pareto front" + (" of each task" if n > 1 else ""), fontsize=13, fontweight="bold")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _draw_panel(fig, ax, pts: pd.DataFrame, objectives: Sequence[Objective], legend: bool) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter

    x, y, x_obj, y_obj = _xy(pts, objectives)
    rank = pts["pareto_rank"].to_numpy(int) if len(pts) else np.zeros(0, int)
    baseline = pts["baseline"].fillna("").astype(str).to_numpy() if "baseline" in pts.columns else np.array([""] * len(pts))
    arch = pts["arch"].fillna("").astype(str).to_numpy() if "arch" in pts.columns else np.array([""] * len(pts))
    c_obj = objectives[2] if len(objectives) >= 3 else None
    cvals = pts[f"metrics.{c_obj.metric}"].to_numpy(float) if c_obj is not None else None
    handles: list[object] = []

    is_front = rank == 0
    is_base = baseline != ""
    scatter_kw: dict[str, object] = {}
    if cvals is not None and len(cvals):
        scatter_kw = dict(c=cvals, cmap="viridis", vmin=np.nanmin(cvals), vmax=np.nanmax(cvals))

    def sub(mask: np.ndarray) -> dict[str, object]:
        if "c" in scatter_kw:
            return {**scatter_kw, "c": cvals[mask]}  # type: ignore[index]
        return {}

    mappable = None
    # dominated, non-baseline points
    m = ~is_front & ~is_base
    if m.any():
        mappable = ax.scatter(x[m], y[m], s=36, alpha=0.75, edgecolors="0.3", linewidths=0.5, zorder=2,
                              **({"color": "0.55"} if not scatter_kw else sub(m)))
        handles.append(Line2D([], [], ls="", marker="o", color="0.55", markeredgecolor="0.3", label="dominated trial"))
    # front, non-baseline points
    m = is_front & ~is_base
    if m.any():
        mappable = ax.scatter(x[m], y[m], s=90, edgecolors=FRONT_COLOUR, linewidths=2.2, zorder=4,
                              **({"color": "#fdd49e"} if not scatter_kw else sub(m)))
    # Pareto step line (2-D front of the plotted objectives)
    if len(pts) and x_obj is not None:
        r2 = non_dominated_sort(np.column_stack([x, y]), [x_obj.mode, y_obj.mode])
        f2 = np.array([r == 0 for r in r2])
        sx, sy = staircase(x[f2], y[f2], x_obj.mode, y_obj.mode)
        ax.plot(sx, sy, color=FRONT_COLOUR, lw=1.8, zorder=3, alpha=0.9)
    front_label = "Pareto front (rank 0)" if len(objectives) <= 2 else f"Pareto front (rank 0, {len(objectives)} objectives)"
    handles.append(Line2D([], [], ls="-", lw=1.8, marker="o", markersize=9, color=FRONT_COLOUR,
                          markerfacecolor="#fdd49e", markeredgecolor=FRONT_COLOUR, markeredgewidth=2.2, label=front_label))
    # baselines
    for name in sorted(set(baseline[is_base].tolist())):
        label, mk, _, col = _baseline_style(name)
        m = baseline == name
        size = 260 if mk == "*" else 110
        face = {"color": col} if not scatter_kw else sub(m)
        ax.scatter(x[m], y[m], s=size, marker=mk, zorder=5,
                   edgecolors=np.where(is_front[m], FRONT_COLOUR, "black").tolist(), linewidths=1.4, **face)
        handles.append(Line2D([], [], ls="", marker=mk, markersize=13 if mk == "*" else 9, color=col,
                              markeredgecolor="black", label=label))

    # labels: the front and the baselines (every point when few), neighbours' offsets alternated
    show = np.ones(len(pts), bool) if len(pts) <= MAX_LABELS // 4 else (is_front | is_base)
    _spread_labels(ax, _labels_at(x[show], y[show], arch[show].tolist()))

    # axes
    ax.set_ylabel(_label(y_obj, pts))
    ax.set_xlabel(_label(x_obj, pts) if x_obj is not None else "ranked trial (start order)")
    for axis, vals, obj in ((ax.yaxis, y, y_obj), (ax.xaxis, x, x_obj)):
        if obj is None:
            continue
        if _use_log(vals, obj.metric):
            (ax.set_yscale if axis is ax.yaxis else ax.set_xscale)("log")
        finite = vals[np.isfinite(vals)]
        if len(finite) and np.nanmax(np.abs(finite)) >= 1e4:
            axis.set_major_formatter(EngFormatter(sep=""))
    ax.margins(x=0.12, y=0.12)
    ax.grid(True, alpha=0.3)
    if c_obj is not None and mappable is not None:
        cb = fig.colorbar(mappable, ax=ax, pad=0.01)
        cb.set_label(_label(c_obj, pts))
        finite_c = cvals[np.isfinite(cvals)] if cvals is not None else np.zeros(0)
        if len(finite_c) and np.abs(finite_c).max() >= 1e4:
            cb.formatter = EngFormatter(sep="")
            cb.update_ticks()
    if legend:
        ax.legend(handles=handles, loc="best", fontsize=8.5, framealpha=0.9)


def _hover_text(row: pd.Series, objectives: Sequence[Objective], param_cols: Sequence[str]) -> str:
    def esc(v: object) -> str:  # plotly's hover labels take <b>/<br> but no entities: escape only < > &
        return html.escape(str(v), quote=False)

    lines = [f"<b>{esc(row.get('arch', '') or '-')}</b>"]
    if row.get("baseline"):
        lines[0] += f" ({esc(row['baseline'])} baseline)"
    if row.get("group") and row.get("group") != ALL_GROUP:
        lines.append(f"task: {esc(row['group'])}")
    lines.append(f"trial: {esc(row.get('trial_id', '') or row.get('run_id', ''))}")
    lines.append(f"pareto rank: {int(row['pareto_rank'])}   status: {esc(row.get('status', ''))}")
    for o in objectives:
        v = row.get(f"metrics.{o.metric}")
        lines.append(f"{esc(o.metric)} ({o.mode}): {format_metric(o.metric, v)}")
    if param_cols:
        lines.append("<i>config</i>")
        for p in param_cols:
            v = row.get(p)
            if v is None or (isinstance(v, float) and np.isnan(v)) or decode_arm(v) is not None:
                continue  # a whole arm's JSON text (older sweeps): its arch id heads the label
            lines.append(f"{esc(p[len('params.'):])} = {esc(v)}")
    return "<br>".join(lines)


def pareto_html(
    trials: pd.DataFrame,
    objectives: Sequence[Objective],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Write an interactive, self-contained (plotly.js inlined; works offline) Pareto scatter, one panel per
    group (task). Hovering a point shows its arch, task, trial id, rank, status, every objective and its config."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    path = Path(path)
    pts_all = _plotted(trials)
    groups = _groups(pts_all)
    ncols = min(len(groups), 2)
    nrows = (len(groups) + ncols - 1) // ncols
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=[g for g in groups] if groups != [""] else None,
                        horizontal_spacing=0.08, vertical_spacing=0.12)
    param_cols = sorted(c for c in pts_all.columns if c.startswith("params."))
    c_obj = objectives[2] if len(objectives) >= 3 else None
    call = pts_all[f"metrics.{c_obj.metric}"].to_numpy(float) if c_obj is not None else None
    legend_seen: set[str] = set()
    x_obj = y_obj = None
    for k, group in enumerate(groups):
        row, col = k // ncols + 1, k % ncols + 1
        pts = pts_all if not group else pts_all[pts_all["group"].astype(str) == group]
        x, y, x_obj, y_obj = _xy(pts, objectives)
        texts = [_hover_text(r, objectives, param_cols) for _, r in pts.iterrows()]
        arch = pts["arch"].fillna("").astype(str).tolist() if "arch" in pts.columns else [""] * len(pts)
        rank = pts["pareto_rank"].to_numpy(int) if len(pts) else np.zeros(0, int)
        baseline = pts["baseline"].fillna("").astype(str).to_numpy() if "baseline" in pts.columns else np.array([""] * len(pts))
        cvals = pts[f"metrics.{c_obj.metric}"].to_numpy(float) if c_obj is not None else None
        is_front, is_base = rank == 0, baseline != ""

        def marker(mask: np.ndarray, **kw: object) -> dict[str, object]:
            mk: dict[str, object] = dict(kw)
            if cvals is not None:
                mk.update(color=cvals[mask].tolist(), colorscale="Viridis", cmin=float(np.nanmin(call)),
                          cmax=float(np.nanmax(call)))
            return mk

        def add(mask: np.ndarray, name: str, mk: dict[str, object], with_text: bool) -> None:
            idx = np.flatnonzero(mask)
            if not len(idx):
                return
            fig.add_trace(go.Scatter(
                x=[float(x[i]) for i in idx], y=[float(y[i]) for i in idx],
                mode="markers+text" if with_text else "markers", name=name, legendgroup=name,
                showlegend=name not in legend_seen, text=[arch[i] for i in idx], textposition="top center",
                textfont=dict(size=10), hovertext=[texts[i] for i in idx], hovertemplate="%{hovertext}<extra></extra>",
                marker=mk,
            ), row=row, col=col)
            legend_seen.add(name)

        add(~is_front & ~is_base, "dominated trial",
            marker(~is_front & ~is_base, size=9, color="#999999", line=dict(color="#444444", width=0.5)),
            len(pts) <= MAX_LABELS // 4)
        if len(pts) and x_obj is not None:
            r2 = non_dominated_sort(np.column_stack([x, y]), [x_obj.mode, y_obj.mode])
            f2 = np.array([r == 0 for r in r2])
            sx, sy = staircase(x[f2], y[f2], x_obj.mode, y_obj.mode)
            fig.add_trace(go.Scatter(x=sx.tolist(), y=sy.tolist(), mode="lines", name="Pareto step line",
                                     legendgroup="step", showlegend="step" not in legend_seen,
                                     line=dict(color=FRONT_COLOUR, width=2), hoverinfo="skip"), row=row, col=col)
            legend_seen.add("step")
        add(is_front & ~is_base, "Pareto front (rank 0)",
            marker(is_front & ~is_base, size=13, color="#fdd49e", line=dict(color=FRONT_COLOUR, width=3)), True)
        for name in sorted(set(baseline[is_base].tolist())):
            label, _, sym, colour = _baseline_style(name)
            m = baseline == name
            add(m, label, marker(m, size=18, symbol=sym, color=colour, line=dict(color="black", width=1.5)), True)
        fig.update_xaxes(title_text=_label(x_obj, pts, "<br>") if x_obj is not None else "ranked trial (start order)",
                         row=row, col=col, **({"type": "log"} if x_obj is not None and _use_log(x, x_obj.metric) else {}))
        fig.update_yaxes(title_text=_label(y_obj, pts, "<br>"), row=row, col=col,
                         **({"type": "log"} if _use_log(y, y_obj.metric) else {}))
    if call is not None and len(fig.data):
        fig.data[0].marker.update(showscale=True, colorbar=dict(title=metric_label(c_obj.metric)))  # type: ignore[union-attr]

    name = title or "sweep"
    fig.update_layout(
        title=dict(text=f"{html.escape(name, quote=False)} — Pareto front"
                        + (" of each task" if len(groups) > 1 else "")
                        + f"<br><sup>{html.escape(_counts_line(trials), quote=False)}</sup>"),
        template="plotly_white", hoverlabel=dict(align="left"), legend=dict(bgcolor="rgba(255,255,255,0.8)"),
        height=560 * nrows, width=None if ncols == 1 else 1400,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path


def hypervolume_png(
    growth: Sequence[float] | dict[str, Sequence[float]],
    path: str | Path,
    *,
    objectives: Sequence[Objective] | None = None,
    reference: Sequence[float] | None = None,
    improved_labels: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 130,
) -> Path:
    """Plot the hypervolume after each trial (trial index in start order) as a step curve; ``growth`` as
    ``{group: curve}`` draws one panel per group (task).

    Trials that raised the hypervolume are marked (and labelled with ``improved_labels[i]`` if given).
    """
    from matplotlib.figure import Figure

    path = Path(path)
    curves = growth if isinstance(growth, dict) else {"": growth}
    fig = Figure(figsize=(8.5 if len(curves) == 1 else 6.5 * len(curves), 5), layout="constrained")
    for k, (group, g) in enumerate(curves.items()):
        ax = fig.add_subplot(1, len(curves), k + 1)
        _hv_panel(ax, np.asarray(list(g), dtype=float), improved_labels)
        sub = " × ".join(f"{o.metric} ({o.mode})" for o in objectives) if objectives is not None else ""
        if reference is not None:
            sub += "   ref = (" + ", ".join(f"{r:.4g}" for r in reference) + ")"
        ax.set_title((f"{group}   " if group else "") + sub, fontsize=9, color="0.3")
    fig.suptitle(f"{title or 'sweep'} — hypervolume over trials", fontsize=12, fontweight="bold")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _hv_panel(ax, g: np.ndarray, improved_labels: Sequence[str] | None) -> None:
    from matplotlib.ticker import EngFormatter, MaxNLocator

    n = len(g)
    if n:
        t = np.arange(1, n + 1)
        ax.step(t, g, where="post", color="#2ca02c", lw=2, label="hypervolume")
        prev = np.concatenate(([0.0], g[:-1]))
        up = g > prev + 1e-12 * max(1.0, abs(g).max())
        ax.plot(t[up], g[up], "o", color="#2ca02c", markersize=6, label="trial improved the front")
        if improved_labels is not None:
            for i in np.flatnonzero(up):
                lab = improved_labels[i]
                if lab:
                    ax.annotate(lab, (t[i], g[i]), xytext=(4, -12), textcoords="offset points", fontsize=7)
        ax.set_xlim(0.5, n + 0.5)
        lo, hi = float(min(0.0, g.min())), float(g.max())
        ax.set_ylim(lo - 0.03 * (hi - lo or 1.0), hi + 0.12 * (hi - lo or 1.0))
        final = EngFormatter(places=4, sep="").format_data(g[-1]) if abs(g[-1]) >= 1e4 else f"{g[-1]:.6g}"
        ax.annotate(f"final: {final}", (n, g[-1]), xytext=(-5, 8), textcoords="offset points", ha="right",
                    fontsize=9, fontweight="bold")
        ax.legend(loc="lower right", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no trials", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if n and np.abs(g).max() >= 1e4:
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel("trial (start order; failed/pruned trials add nothing)")
    ax.set_ylabel("hypervolume")
    ax.grid(True, alpha=0.3)
