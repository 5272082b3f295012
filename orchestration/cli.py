"""The `hqlt` command: info, train, validate, sweep, status, ui, report, bench.

Each subcommand lives beside what it drives; this module only wires argparse. Bad input is one line on
stderr and exit code 2, before any work starts.
"""
from __future__ import annotations

import argparse
import sys

from hqlt.blocks.configs import ConfigError


def _commands():
    # Imported here so that `hqlt --help` and a bad config fail fast without loading torch or ray first.
    from hqlt.kernels import bench_cli
    from hqlt.reports import cli as report_cli

    from . import cmd_info, cmd_sweep, cmd_train

    return {"info": cmd_info, "train": cmd_train, **cmd_sweep.COMMANDS, "report": report_cli, "bench": bench_cli}


HELP = {
    "info": "versions, device and available kernel backends",
    "train": "run one trial (no Ray): hqlt train CONFIG.yaml [key=value ...]",
    "validate": "check a sweep spec and print the space size and parameter range",
    "sweep": "run a sweep: hqlt sweep SPEC.yaml [key=value ...]",
    "status": "counts by status and the best trials of a sweep folder",
    "ui": "open the MLflow UI of a sweep folder on 127.0.0.1",
    "report": "Pareto fronts, hypervolume, plots of a sweep",
    "bench": "kernel and model benchmarks",
}


def build_parser(cmds) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hqlt",
        description="Architecture search and sweeps for hybrid quadratic-linear (KV + fast-weight) models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in cmds.items():
        p = sub.add_parser(name, help=HELP.get(name, ""), description=HELP.get(name, ""))
        module.configure_parser(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    cmds = _commands()
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


if __name__ == "__main__":
    sys.exit(main())
