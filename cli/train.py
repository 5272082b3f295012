"""`hqlt train CONFIG.yaml [key=value ...]`: one trial without Ray, with a progress bar and a metrics JSON."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from hqlt.search_space.labels import format_metric
from hqlt.search_space.vocabulary import (COMPLETED, PARAMS, TEST_ACC, TEST_ACC_SCALED, TEST_BPB, TRAIN_LOSS,
                                          TRAIN_TOK_S, VAL_ACC, VAL_ACC_SCALED, VAL_BPB, VAL_LOSS)


def configure_parser(parser) -> None:
    parser.add_argument("config", help="trial config YAML (model, task, train, probe, seed)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides merged on top of the file")
    parser.add_argument("--out", help="folder for metrics.json (default: runs/<arch>-<time>)")
    parser.add_argument("--tracking-uri", help="also log the run to this MLflow tracking URI")
    parser.add_argument("--experiment", default="hqlt-train", help="MLflow experiment name (with --tracking-uri)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def load_trial(path: str, overrides) -> dict:
    from hqlt.orchestration.configio import load_yaml, merge_overrides, to_plain
    from hqlt.orchestration.trial_config import trial_config

    plain = to_plain(merge_overrides(load_yaml(path), overrides))
    trial_config(plain)  # validate now: a bad key fails before any work
    return plain


def run(args) -> int:
    from tqdm import tqdm

    from hqlt.orchestration.trial import run_trial

    plain = load_trial(args.config, args.overrides)
    steps = int(plain.get("train", {}).get("steps", 1000))
    history: list[dict] = []
    bar = tqdm(total=steps, desc="setup", unit="step", disable=args.quiet, file=sys.stderr, ncols=100)

    def progress(step: int, metrics: dict) -> None:
        bar.update(step - bar.n)
        post = {"loss": f"{metrics.get(TRAIN_LOSS, float('nan')):.4f}"}
        for key in (VAL_ACC, VAL_BPB):
            if key in metrics:
                post[key.split("/")[1]] = f"{metrics[key]:.3f}"
        bar.set_postfix(post)

    start = time.time()
    # the probe and the test evaluation take a while without steps: the bar names the phase
    result = run_trial(plain, report=history.append, progress=progress,
                       phase=lambda name: bar.set_description(name, refresh=True))
    bar.close()
    out = Path(args.out or f"runs/{result.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    payload = {**result.as_dict(), "history": history, "wall_s": time.time() - start}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2, default=str))
    if args.tracking_uri:
        from hqlt.orchestration.tracking import log_single_trial

        rid = log_single_trial(args.tracking_uri, args.experiment, result, history, run_name=result.arch)
        print(f"mlflow run {rid} in experiment '{args.experiment}' at {args.tracking_uri}")
    m = result.metrics
    shown = {k: m[k] for k in (VAL_ACC, VAL_ACC_SCALED, VAL_LOSS, VAL_BPB, TEST_ACC, TEST_ACC_SCALED, TEST_BPB,
                               TRAIN_TOK_S, PARAMS) if k in m}
    print(f"{result.arch}: {result.status}{' (' + result.reason + ')' if result.reason else ''}")
    for k, v in shown.items():
        print(f"  {k:<18} {format_metric(k, v)}")
    print(f"metrics: {out / 'metrics.json'}")
    return 0 if result.status == COMPLETED else 1
