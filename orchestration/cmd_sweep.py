"""`hqlt validate`, `hqlt sweep`, `hqlt status`, `hqlt ui`."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from hqlt.blocks.configs import ConfigError


def _load(spec_path: str, overrides):
    """Parse and fully validate a spec (raises a one-line SpecError); nothing touches the disk."""
    from hqlt.search_space import load_spec

    from .space_hooks import HOOKS

    return load_spec(spec_path, overrides, hooks=HOOKS)


class validate:  # noqa: N801 — a subcommand namespace
    @staticmethod
    def configure_parser(p) -> None:
        p.add_argument("spec", help="sweep spec YAML")
        p.add_argument("overrides", nargs="*", help="key.path=value overrides (e.g. sweep.num_samples=4)")

    @staticmethod
    def run(args) -> int:
        from hqlt.search_space import describe, load_spec, validate

        from .space_hooks import HOOKS

        spec = load_spec(args.spec, args.overrides)
        info = describe(spec, HOOKS, survey_result=validate(spec, HOOKS))
        lo, hi = info["params_range"] or (0, 0)
        print(f"ok: {args.spec}: sweep '{spec.name}', {info['parameters']} searched keys "
              f"({info['conditional']} conditional), space size {info['space_size']}, "
              f"model parameters {int(lo):,}–{int(hi):,} over {info['candidates_valid']} valid of "
              f"{info['candidates_checked']} candidates checked ({'all' if info['enumerated'] else 'sampled'})")
        print(f"objectives: {', '.join(info['objectives'])}; sampler {info['sampler']}, scheduler {info['scheduler']}")
        return 0


class sweep:  # noqa: N801
    @staticmethod
    def configure_parser(p) -> None:
        p.add_argument("spec", help="sweep spec YAML")
        p.add_argument("overrides", nargs="*", help="key.path=value overrides merged on top of the spec")
        p.add_argument("--dir", help="sweep folder (default: sweeps/<sweep.name>); rerun on it to resume")
        p.add_argument("--address", help="join a Ray cluster (default: RAY_ADDRESS, else a local Ray)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite inside the sweep folder)")
        p.add_argument("--fresh", action="store_true", help="discard an existing sweep in the folder and start anew")
        p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2, 3], help="Ray Tune verbosity")

    @staticmethod
    def run(args) -> int:
        from .sweep import run_sweep, sweep_dir_for

        spec = _load(args.spec, args.overrides)  # all validation before anything touches the disk
        return run_sweep(spec, directory=sweep_dir_for(spec, args.dir), tracking_uri=args.tracking_uri,
                         address=args.address, fresh=args.fresh, verbose=args.verbose)


def _sweep_meta(directory: str) -> dict:
    from .sweep import embedded_uri

    meta = Path(directory) / "sweep.json"
    if not meta.is_file():
        raise ConfigError("DIR", f"{directory}: not a sweep folder (no sweep.json)")
    data = json.loads(meta.read_text())
    data["tracking_uri"] = data.get("tracking_uri") or embedded_uri(Path(directory))
    return data


class status:  # noqa: N801
    @staticmethod
    def configure_parser(p) -> None:
        p.add_argument("dir", help="sweep folder")

    @staticmethod
    def run(args) -> int:
        from . import tracking
        from .sweep import summarize

        meta = _sweep_meta(args.dir)
        objectives = [tuple(o) for o in meta["objectives"]]
        summary = summarize(tracking.client(meta["tracking_uri"]), meta["name"], objectives)
        counts = ", ".join(f"{v} {k}" for k, v in sorted(summary["counts"].items())) or "none yet"
        print(f"sweep '{meta['name']}' in {args.dir}: {summary['n']} trials ({counts})")
        names = [m for m, _ in objectives]
        for row in summary["best"]:
            print("  " + f"{row['arch']:<22}" + "  ".join(
                f"{m}={row[m]:.4g}" if row[m] is not None else f"{m}=n/a" for m in names))
        return 0


class ui:  # noqa: N801
    @staticmethod
    def configure_parser(p) -> None:
        p.add_argument("dir", help="sweep folder")
        p.add_argument("--port", type=int, default=5000)

    @staticmethod
    def run(args) -> int:
        meta = _sweep_meta(args.dir)
        exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
        cmd = [exe, "ui", "--backend-store-uri", meta["tracking_uri"], "--host", "127.0.0.1", "--port", str(args.port)]
        print(f"MLflow UI for sweep '{meta['name']}': http://127.0.0.1:{args.port}  (Ctrl-C to stop)")
        return subprocess.call(cmd)


COMMANDS = {"validate": validate, "sweep": sweep, "status": status, "ui": ui}
