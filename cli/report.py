"""``hqlt report [DIR] [--tracking-uri URI --experiment NAME] [--objectives M:max,...] [--out DIR] [--seed-stats]``

The main CLI (:mod:`hqlt.cli`) mounts this as a subcommand::

    sub = subparsers.add_parser("report", help="Pareto report of a sweep")
    hqlt.cli.report.configure_parser(sub)
    sub.set_defaults(func=hqlt.cli.report.run)

`hqlt sweep` runs the same report at the end of a sweep (:func:`end_of_sweep_report`).

Where the sweep is:

* ``DIR`` (a sweep folder): tracking URI ``sqlite:///<DIR>/mlflow.db``; experiment = ``name`` in
  ``<DIR>/sweep.json``, else the only experiment in that database other than ``Default``. Local copies of the
  artifacts go to ``<DIR>/report/`` unless ``--out`` says otherwise.
* otherwise ``--tracking-uri`` (or ``$MLFLOW_TRACKING_URI``) plus ``--experiment`` (may be omitted when the
  store holds a single non-Default experiment). Without ``--out`` no local copies are kept.

Explicit ``--tracking-uri`` / ``--experiment`` win over what ``DIR`` implies.
Every report writes the seed statistics (:mod:`hqlt.reports.seed_stats`: per arm the spread over its seeds, the
scored checkpoint, per-length accuracy, which orderings the seeds separate) to ``seed_stats.md`` and the end of
``front.md``; ``--seed-stats`` also prints them, ``--seed-metric`` picks their objective (default: the first).
Exit status: 0 ok; 1 the sweep has no completed trials (a message says so); 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from hqlt.blocks.validation import ConfigError
from hqlt.orchestration.sweep_folder import adopt_moved_folder, read_meta
from hqlt.search_space.vocabulary import (MLFLOW_DB, PARETO_RANK_TAG, REPORT_DIR, SWEEP_JSON, sqlite_uri)

__all__ = ["configure_parser", "run", "main", "end_of_sweep_report"]

PROG = "hqlt report"


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``hqlt report`` arguments to ``parser`` (a subparser or a fresh parser) and return it."""
    if not parser.description:
        parser.description = (
            "Rank a sweep's completed trials (Pareto / non-dominated sorting), compute the hypervolume, "
            "print the front, tag child runs with pareto_rank and log plots and tables on the sweep's parent run."
        )
    parser.add_argument("dir", nargs="?", metavar="DIR", default=None,
                        help="sweep folder (holds mlflow.db and sweep.json)")
    parser.add_argument("--tracking-uri", dest="tracking_uri", default=None, metavar="URI",
                        help="MLflow tracking URI (default: sqlite:///DIR/mlflow.db, else $MLFLOW_TRACKING_URI)")
    parser.add_argument("--experiment", default=None, metavar="NAME",
                        help="MLflow experiment (= sweep name; default: from DIR/sweep.json)")
    parser.add_argument("--objectives", default=None, metavar="M:max,M:min",
                        help="override the sweep's objectives, e.g. val/acc:max,perf/train_tok_s:max")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for local copies of the artifacts (default: DIR/report with a sweep folder)")
    parser.add_argument("--max-rank", dest="max_rank", type=int, default=0, metavar="R",
                        help="show ranks 0..R in the tables (default 0: the front only)")
    parser.add_argument("--reference", default=None, metavar="V1,V2,...",
                        help="hypervolume reference point, one value per objective (default: derived from data)")
    parser.add_argument("--group-by", dest="group_by", default=None, metavar="KEY[,KEY]",
                        help="rank one front per value of these params (default: every searched task.* key; "
                             "'none': one front over all trials)")
    parser.add_argument("--seed-stats", dest="seed_stats", action="store_true",
                        help="also print the seed statistics (per arm: seeds, best, median, min, max, each seed, "
                             "scored checkpoint, per-length accuracy; which orderings the seeds separate)")
    parser.add_argument("--seed-metric", dest="seed_metric", default=None, metavar="M[:max|min]",
                        help="objective of the seed statistics (default: the first of the sweep's objectives, "
                             "or of --objectives; a metric that is not an objective needs its mode)")
    parser.add_argument("--no-log", dest="no_log", action="store_true",
                        help="do not write tags, metrics or artifacts to MLflow (needs --out or DIR to keep files)")
    return parser


class _InputError(Exception):
    pass


def _sweep_name_from_dir(d: Path) -> str | None:
    name = (read_meta(d) or {}).get("name")
    if name is not None and not isinstance(name, str):
        raise _InputError(f"{d / SWEEP_JSON}: key 'name' must be a string")
    return name or None


def _only_experiment(uri: str) -> str:
    from hqlt.reports.mlflow_io import client_for, list_experiment_names

    names = [n for n in list_experiment_names(client_for(uri)) if n != "Default"]
    if len(names) == 1:
        return names[0]
    if not names:
        raise _InputError(f"no experiments in {uri}")
    raise _InputError(f"several experiments in {uri} ({', '.join(sorted(names))}); pick one with --experiment")


def _resolve(args: argparse.Namespace) -> tuple[str, str, Path | None]:
    uri = getattr(args, "tracking_uri", None)
    name = getattr(args, "experiment", None)
    out = Path(args.out) if getattr(args, "out", None) else None
    d = getattr(args, "dir", None)
    if d is not None:
        folder = Path(d)
        if not folder.is_dir():
            raise _InputError(f"no such sweep folder: {folder}")
        if uri is None:
            uri = (read_meta(folder) or {}).get("tracking_uri")  # a sweep logged to a server says so
        if uri is None:
            if not (folder / MLFLOW_DB).is_file():
                raise _InputError(f"{folder} has no {MLFLOW_DB} (not a sweep folder?); use --tracking-uri")
            adopt_moved_folder(folder)  # artifacts land in this folder, not where the sweep first ran
            uri = sqlite_uri(folder)
        if name is None:
            name = _sweep_name_from_dir(folder)
        if out is None:
            out = folder / REPORT_DIR
    if uri is None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise _InputError("give a sweep folder DIR or --tracking-uri URI")
    if name is None:
        name = _only_experiment(uri)
    return uri, name, out


def _sweep_id(args: argparse.Namespace, experiment: str) -> str | None:
    """The sweep id of the folder DIR (its report is that sweep's, not another sweep of the same name on the same
    server); None without DIR, or when --experiment names another experiment than the folder's sweep."""
    d = getattr(args, "dir", None)
    meta = (read_meta(Path(d)) or {}) if d is not None else {}
    return meta.get("sweep_id") if meta.get("name") == experiment else None


def _parse_reference(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise _InputError(f"bad --reference {text!r}: expected comma-separated numbers") from None


def run(args: argparse.Namespace) -> int:
    """Run ``hqlt report``; returns the exit status (0 ok, 1 no completed trials, 2 bad input)."""
    from hqlt.reports.mlflow_io import NoCompletedTrials, ReportError
    from hqlt.reports.objectives import ObjectiveSpecError

    for noisy in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def fail(msg: str, code: int = 2) -> int:
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return code

    try:
        uri, name, out = _resolve(args)
        reference = _parse_reference(getattr(args, "reference", None))
        max_rank = int(getattr(args, "max_rank", 0) or 0)
        if max_rank < 0:
            raise _InputError("--max-rank must be >= 0")
        from hqlt.reports.report import write_report

        result = write_report(uri, name, objectives=getattr(args, "objectives", None), out_dir=out,
                              reference=reference, max_rank=max_rank,
                              log_to_mlflow=not getattr(args, "no_log", False),
                              group_by=getattr(args, "group_by", None), sweep_id=_sweep_id(args, name),
                              seed_metric=getattr(args, "seed_metric", None))
    except NoCompletedTrials as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except (_InputError, ConfigError, ReportError, ObjectiveSpecError) as e:
        return fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    # MLflow store/server problems: one line, from hqlt.cli.main

    print(result.table)
    print()
    from hqlt.search_space.labels import format_metric, format_number

    def hv_line(hv: float, ref: list) -> str:
        point = ", ".join(format_metric(o.metric, v) for o, v in zip(result.objectives, ref))
        return f"hypervolume {format_number(hv)}  (reference point: {point})"

    if result.groups:
        for label, g in result.groups.items():
            print(f"{label}: front {g['front_size']} of {g['n_ranked']}; {hv_line(g['hypervolume'], g['reference_point'])}")
    else:
        print(hv_line(result.hypervolume, result.reference_point))
    if getattr(args, "seed_stats", False) and result.seed_stats:
        print()
        print(result.seed_stats.rstrip())
        print()
    if result.artifacts:
        print(f"parent run {result.parent_run_id}: tags {PARETO_RANK_TAG} on {result.n_trials} trial runs; artifacts:")
        for a in result.artifacts:
            print(f"  {result.artifact_uri.rstrip('/')}/{a}")
    if result.files:
        print("local copies:")
        for p in result.files.values():
            print(f"  {Path(p).resolve()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m hqlt.cli.report``)."""
    parser = configure_parser(argparse.ArgumentParser(prog=PROG))
    return run(parser.parse_args(argv))


def end_of_sweep_report(tracking_uri: str, experiment: str, directory: Path) -> None:
    """Pareto fronts, hypervolume and plots on the parent run; a failing report never fails the sweep."""
    try:
        from hqlt.reports.report import write_report
    except ImportError:
        return
    try:
        result = write_report(tracking_uri, experiment, out_dir=str(directory / REPORT_DIR),
                              sweep_id=(read_meta(directory) or {}).get("sweep_id"))
        text = getattr(result, "table", None)
        if text:
            print(text)
    except Exception as exc:  # noqa: BLE001
        import traceback

        where = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)[-3:])
        print(f"report skipped: {type(exc).__name__}: {exc} (at {where}); rerun: hqlt report {directory}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
