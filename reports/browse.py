"""What makes the MLflow UI open on a sweep's Pareto front.

* the experiment tag ``mlflow.experimentKind = custom_model_development`` (a classic training experiment), and
  ``workflowType=machine_learning`` in every link: MLflow 3.17's UI picks GenAI or "Model training" from a
  global switch (the URL parameter, else the browser's last choice, GenAI at first), and only then the
  experiment's kind — without both, a sweep opens on the GenAI overview (traces, token usage) instead of runs;
* a shared view of the runs table (experiment tag ``mlflow.sharedViewState.hqlt-pareto-front``, the JSON the UI's
  "Share" button writes): the front's runs (``tags.pareto_rank = '0'``), sorted by the first objective, with the
  objectives, the rank, the task and the architecture as columns. :func:`front_url` links to it;
* the parent run's description (``mlflow.note.content``, Markdown): the front table of each task and the plots
  (:func:`description`).
"""

from __future__ import annotations

import json
from typing import Sequence
from urllib.parse import quote

from hqlt.search_space.vocabulary import (ARCH_TAG, EXPERIMENT_KIND_RUNS, EXPERIMENT_KIND_TAG, FRONT_VIEW_KEY,
                                          OBJECTIVES_TAG, PARETO_GROUP_TAG, PARETO_PNG, PARETO_RANK_METRIC,
                                          PARETO_RANK_TAG, REPORT_GROUP_BY_TAG, ROLE_SWEEP, ROLE_TAG,
                                          SHARED_VIEW_TAG_PREFIX)

from .objectives import Objective, objectives_from_tag

__all__ = ["FRONT_FILTER", "description", "ensure_browsable", "front_url", "front_view_state", "run_url", "runs_url"]

FRONT_FILTER = f"tags.{PARETO_RANK_TAG} = '0'"
WORKFLOW = "workflowType=machine_learning"  # the UI's "Model training" side (runs), not GenAI (traces)


def _column(kind: str, key: str) -> str:
    """A runs-table column id as the MLflow UI writes it: metrics.`val/acc`, params.`task.name`, tags.`arch`."""
    return f"{kind}.`{key}`"


def front_view_state(objectives: Sequence[Objective], group_keys: Sequence[str] = ()) -> dict:
    """The runs-table view of the front: filter, sort by the first objective, the columns that matter."""
    columns = [_column("metrics", o.metric) for o in objectives]
    columns += [_column("params", k) for k in group_keys]
    columns += [_column("tags", ARCH_TAG), _column("metrics", PARETO_RANK_METRIC)]
    if group_keys:
        columns.append(_column("tags", PARETO_GROUP_TAG))
    first = objectives[0]
    return {
        "searchFilter": FRONT_FILTER,
        "orderByKey": _column("metrics", first.metric),
        "orderByAsc": first.mode == "min",
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": columns,
        "columnOrder": columns,  # the grid's column ids are the selected columns' ids
        # whole numbers and arch ids, not "2555935.70…"
        "columnWidths": {**{c: 150 for c in columns[:len(objectives)]}, _column("tags", ARCH_TAG): 170},
        "runsExpanded": {},
        "runsPinned": [],
        "runsHidden": [],
        "runListHidden": False,
        "viewMaximized": False,
        "groupBy": None,
    }


def ensure_browsable(client, experiment_id: str, objectives: Sequence[Objective] | None = None,
                     group_keys: Sequence[str] | None = None) -> None:
    """Tag the experiment so the UI opens on runs, and write the front's shared view (objectives and group keys
    from the latest report on the parent run when not given). Only writes what differs."""
    exp = client.get_experiment(experiment_id)
    tags = dict(exp.tags)
    if tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND_RUNS:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_RUNS)
    if objectives is None or group_keys is None:
        parents = client.search_runs([experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_SWEEP}'",
                                     max_results=1)
        ptags = parents[0].data.tags if parents else {}
        if objectives is None:
            if not ptags.get(OBJECTIVES_TAG):
                return
            objectives = objectives_from_tag(ptags[OBJECTIVES_TAG])
        if group_keys is None:
            group_keys = json.loads(ptags.get(REPORT_GROUP_BY_TAG) or "[]")
    state = json.dumps(front_view_state(objectives, group_keys))
    if tags.get(SHARED_VIEW_TAG_PREFIX + FRONT_VIEW_KEY) != state:
        client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG_PREFIX + FRONT_VIEW_KEY, state)


def runs_url(base_url: str, experiment_id: str) -> str:
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{WORKFLOW}"


def front_url(base_url: str, experiment_id: str) -> str:
    """The deep link to the front: the experiment's runs table in the shared view of :func:`front_view_state`."""
    return f"{runs_url(base_url, experiment_id)}&viewStateShareKey={quote(FRONT_VIEW_KEY)}"


def run_url(base_url: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """A run's page (its description, params, metrics); with ``artifact`` its artifact view of that file."""
    tail = f"/artifacts/{quote(artifact)}" if artifact else ""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}{tail}?{WORKFLOW}"


def description(title: str, groups: Sequence[tuple[str, str, str]], parent_run_id: str, artifacts: Sequence[str],
                summary: str) -> str:
    """The parent run's description (Markdown): per group a heading, its hypervolume line and its front table;
    then the Pareto plot (shown inline), links to every report file and the status summary.

    ``groups``: (label, hypervolume line, Markdown table); one with label "" when the sweep has a single front."""
    def artifact(name: str) -> str:  # served by the MLflow server, relative to the UI's page
        return f"get-artifact?path={quote(name)}&run_uuid={parent_run_id}"

    lines = [f"**{title}** — the Pareto front (rank 0{' of each task' if len(groups) > 1 else ''}); "
             f"filter the runs with `{FRONT_FILTER}`.", ""]
    for label, hv_line, table in groups:
        if label:
            lines += [f"**{label}**", ""]
        lines += [hv_line, "", table.strip(), ""]
    if PARETO_PNG in artifacts:
        lines += [f"![Pareto front]({artifact(PARETO_PNG)})", ""]
    links = " · ".join(f"[{name}]({artifact(name)})" for name in artifacts)
    if links:
        lines += [f"Files: {links}", ""]
    lines.append(summary)
    return "\n".join(lines)
