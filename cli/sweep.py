"""`hqlt validate`, `hqlt sweep`, `hqlt status` (`hqlt ui`, `hqlt dashboard`: cli/browse.py)."""
from __future__ import annotations

from pathlib import Path

from hqlt.blocks.validation import ConfigError


def _load(spec_path: str, overrides):
    """Parse and fully validate a spec (raises a one-line SpecError); nothing touches the disk."""
    from hqlt.orchestration.space_hooks import HOOKS
    from hqlt.search_space import load_spec

    return load_spec(spec_path, overrides, hooks=HOOKS)


class validate:  # noqa: N801 — a subcommand namespace
    @staticmethod
    def configure_parser(p) -> None:
        p.add_argument("spec", help="sweep spec YAML")
        p.add_argument("overrides", nargs="*", help="key.path=value overrides (e.g. sweep.num_samples=4)")

    @staticmethod
    def run(args) -> int:
        from hqlt.orchestration.space_hooks import HOOKS
        from hqlt.search_space import describe, load_spec, validate

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
        from hqlt.orchestration.sweep import run_sweep, sweep_dir_for

        from .report import end_of_sweep_report

        spec = _load(args.spec, args.overrides)  # all validation before anything touches the disk
        return run_sweep(spec, directory=sweep_dir_for(spec, args.dir), tracking_uri=args.tracking_uri,
                         address=args.address, fresh=args.fresh, verbose=args.verbose, report=end_of_sweep_report)


def _sweep_meta(directory: str) -> dict:
    from hqlt.orchestration.sweep_folder import read_meta, tracking_uri
    from hqlt.search_space.vocabulary import SWEEP_JSON

    data = read_meta(Path(directory))
    if data is None:
        raise ConfigError("DIR", f"{directory}: not a sweep folder (no {SWEEP_JSON})")
    data["tracking_uri"] = tracking_uri(Path(directory), data)
    return data


class status:  # noqa: N801
    @staticmethod
    def configure_parser(p) -> None:
        p.add_argument("dir", help="sweep folder")

    @staticmethod
    def run(args) -> int:
        from hqlt.orchestration import tracking
        from hqlt.orchestration.sweep import print_best_trials, summarize
        from hqlt.orchestration.sweep_folder import folder_in_use
        from hqlt.search_space.vocabulary import REPORT_ARTIFACTS, REPORT_OBJECTIVES_TAG, RESULTS_DIR

        meta = _sweep_meta(args.dir)
        objectives = [tuple(o) for o in meta["objectives"]]
        uri = meta["tracking_uri"]
        if tracking.is_server(uri):
            tracking.check_server(uri)
        cl = tracking.client(uri)
        # this folder's sweep only (its sweep id), never another sweep of the same name on the same server
        parent = tracking.find_parent(cl, meta["name"], meta["sweep_id"]) if meta.get("sweep_id") else None
        summary = summarize(cl, meta["name"], objectives, parent.info.run_id if parent else None)
        if meta.get("sweep_id") and parent is None:
            summary = {**summary, "n": 0, "counts": {}, "best": []}
        counts = ", ".join(f"{v} {k}" for k, v in sorted(summary["counts"].items())) or "none yet"
        size = f" of {meta['num_samples']}" if meta.get("num_samples") else ""
        print(f"sweep '{meta['name']}' in {args.dir}: {summary['n']}{size} trials ({counts})")
        print_best_trials(summary["best"], objectives)
        running = folder_in_use(Path(args.dir))
        if running:
            print(f"running now ({running})")
        elif meta.get("sweep_id") and not meta.get("finished"):  # (folders from before sweep ids: not known)
            print("not finished: its last run stopped before the end (killed or interrupted); run the same "
                  "`hqlt sweep` command (same spec, same --dir) to resume it")
            results = Path(args.dir) / RESULTS_DIR
            if any(results.glob("*.snapshot.pt")):  # torch only then
                from hqlt.orchestration.seed_snapshot import snapshots_in

                for trial, seed, step in snapshots_in(results):
                    print(f"  trial {trial} seed {seed}: resumes at step {step:,} (seed snapshot)")
        # a whole report: its tags, and its last artifact (a report cut off by a kill has the tags at most)
        reported = parent is not None and REPORT_OBJECTIVES_TAG in parent.data.tags and REPORT_ARTIFACTS[-1] in {
            a.path for a in cl.list_artifacts(parent.info.run_id)}
        if parent is not None and not reported and summary["counts"].get("completed"):
            print(f"no report yet: {'the resumed sweep writes it at its end, or ' if not meta.get('finished') else ''}"
                  f"hqlt report {args.dir}")
        return 0


COMMANDS = {"validate": validate, "sweep": sweep, "status": status}  # ui: cli/browse.py
