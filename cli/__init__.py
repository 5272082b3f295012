"""The `hqlt` command: info, train, validate, sweep, status, ui, dashboard, report, bench.

The top layer of hqlt: it may import every other package (the sweep and its end-of-sweep report meet only
here). Each subcommand's arguments and glue live in a module of this package beside the others, calling
what it drives; this module only wires argparse. Bad input is one line on stderr and exit code 2, before
any work starts.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys

from hqlt.blocks.validation import ConfigError

# command -> the module that holds it (a module's COMMANDS[name], else the module itself). Only the command
# being run is imported: `hqlt --help` and a bad config fail fast without loading torch, ray or mlflow.
MODULES = {"info": "hqlt.cli.info", "train": "hqlt.cli.train", "validate": "hqlt.cli.sweep",
           "sweep": "hqlt.cli.sweep", "status": "hqlt.cli.sweep", "ui": "hqlt.cli.browse",
           "dashboard": "hqlt.cli.browse", "report": "hqlt.cli.report", "bench": "hqlt.benchmarks.cli"}


def _command(name: str):
    module = importlib.import_module(MODULES[name])
    return getattr(module, "COMMANDS", {}).get(name, module)


def _commands(names=None):
    return {name: _command(name) for name in (names if names is not None else MODULES)}


HELP = {
    "info": "versions, device and available kernel backends",
    "train": "run one trial (no Ray): hqlt train CONFIG.yaml [key=value ...]",
    "validate": "check a sweep spec and print the space size and parameter range",
    "sweep": "run a sweep: hqlt sweep SPEC.yaml [key=value ...]",
    "status": "counts by status and the best trials of a sweep folder",
    "ui": "MLflow UI of a sweep folder, linked to its Pareto front",
    "dashboard": "live optuna-dashboard of a sweep's study ([dashboard] extra)",
    "report": "Pareto fronts, hypervolume, plots of a sweep",
    "bench": "kernel and model benchmarks",
}


def build_parser(cmds) -> argparse.ArgumentParser:
    """Every command is listed; those in `cmds` ({name: module}) get their own arguments."""
    parser = argparse.ArgumentParser(
        prog="hqlt",
        description="Architecture search and sweeps for hybrid quadratic-linear (KV + fast-weight) models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in MODULES:
        p = sub.add_parser(name, help=HELP.get(name, ""), description=HELP.get(name, ""))
        if name in cmds:
            cmds[name].configure_parser(p)
            p.set_defaults(_run=cmds[name].run)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    cmds = _commands([chosen] if chosen in MODULES else [])
    parser = build_parser(cmds)
    # key=value overrides may also follow the options (`hqlt sweep SPEC --dir D a.b=1`), which argparse's
    # positional handling alone would reject.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:
        print(f"hqlt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hqlt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:   # an MLflow store or server problem: one line, not a traceback
        line = mlflow_error_line(exc)
        if line is None:
            raise
        print(f"hqlt {args.command}: error: {line}", file=sys.stderr)
        return 2


def mlflow_error_line(exc: BaseException) -> str | None:
    """One line for an ``MlflowException`` (None for anything else). A database whose schema this MLflow does
    not know is named as what it usually is here: a store written by another MLflow version (e.g. a sweep folder
    from a GPU host), which ``mlflow db upgrade`` cannot open when that version is newer."""
    errors = sys.modules.get("mlflow.exceptions")   # loaded when MLflow raised it; never imported here
    if errors is None or not isinstance(exc, errors.MlflowException):
        return None
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "out-of-date database schema" in text:
        from hqlt.orchestration.tracking import other_version_message
        found = re.search(r"found version (\w+), but expected (\w+)", text)
        return other_version_message(*(found.groups() if found else ()))
    return f"MLflow: {text}"


__all__ = ["build_parser", "main", "mlflow_error_line"]
