"""Run GPU test files so that one CUDA crash cannot hide the rest, and record every case's outcome.

A CUDA error such as an illegal memory access poisons the process: every later test in it fails. This runner
collects the node ids, runs each test class (or module-level group) in its own pytest process, and when a
group's process reports a CUDA error, re-runs that group one case per process. The outcome of every case
goes to a JSON file (``--out``), with the card's name.

Most of a GPU suite's wall time on a fresh machine is Triton compiling (and fla autotuning) on the CPU, one
process at a time. ``--jobs N`` runs N such processes at once on the same card, each on a shard of at most
``--shard-size`` cases of one group: isolation is unchanged (a crash poisons one shard's process, which is then
re-run case by case), and the compiles of different shards overlap.

    python tests/run_gpu_isolated.py tests/test_gpu_fused.py tests/test_gpu_backends.py \
        --out kernels/results/gpu_tests_h200.json [-k EXPR] [--jobs 8 --shard-size 12] [--skip-passed EARLIER.json ...]

A result then goes into the card's record as one run (its letter, the code it tested, a note):

    python tests/run_gpu_isolated.py merge kernels/results/gpu_suite_h200.json OUT.json --run I --code 1a2b3c4 \
        --note "both files whole at the round-20 defaults"
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

POISON = re.compile(r"illegal memory access|CUDA error|unspecified launch failure|device-side assert", re.I)


def collect(files: list[str], kexpr: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", *files]
    if kexpr:
        cmd += ["-k", kexpr]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if "::" in line and not line.startswith(" ")]


def group_of(node: str) -> str:
    parts = node.split("::")
    return "::".join(parts[:2]) if len(parts) > 2 else parts[0] + "::<module>"


def run_nodes(nodes: list[str], timeout: float) -> tuple[dict, str]:
    """Run `nodes` in one pytest process; outcome per node from its JUnit XML, and the combined output."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}",
               *nodes]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            log = f"timeout after {timeout:.0f} s\n{(e.stdout or b'')!s}"
        outcomes = {}
        if os.path.exists(xml):
            for case in ET.parse(xml).getroot().iter("testcase"):
                cls = case.get("classname", "")
                name = case.get("name", "")
                outcome, message = "passed", ""
                for tag in ("failure", "error", "skipped"):
                    el = case.find(tag)
                    if el is not None:
                        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                        message = (el.get("message") or "")[:400]
                        break
                outcomes[(cls, name)] = {"outcome": outcome, "message": message,
                                         "seconds": float(case.get("time", 0))}
    return outcomes, log


def match(node: str, outcomes: dict) -> dict | None:
    path, *rest = node.split("::")
    name = rest[-1]
    mod = path[:-3].replace("/", ".")
    cls = mod + ("." + rest[0] if len(rest) > 1 else "")
    return outcomes.get((cls, name))


def outcome_counts(cases) -> dict[str, int]:
    """{outcome: cases with it} of case records (dicts with an "outcome")."""
    counts: dict[str, int] = {}
    for c in cases:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    return counts


def write(args, card, versions, argv, t0, results, n_collected) -> dict:
    total = outcome_counts(results.values())
    doc = {"card": card, "versions": versions, "command": " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
           "wall_s": round(time.time() - t0, 1), "collected": n_collected, "counts": total, "cases": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, args.out)
    return total


def merge(record: dict, new: dict, run: str, code: str, note: str, date: str | None = None) -> dict:
    """Add one ``--out`` result (``new``) to a card's record (kernels/results/gpu_suite_<card>.json) as run ``run``:
    the run's entry in "runs"; per case the new outcome, with the earlier one under "before" where the record had the
    case; "counts_latest" recounted over every case. Refuses a run letter already used or a record of another card."""
    if any(r["run"] == run for r in record["runs"]):
        raise ValueError(f"run {run!r} is already in the record")
    cards = {r["card"] for r in record["runs"]}
    if cards and new["card"] not in cards:
        raise ValueError(f"the record is of {sorted(cards)}; this result ran on {new['card']!r}")
    record["runs"].append({"run": run, "date": date or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "code": code, "card": new["card"], "versions": new["versions"], "command": new["command"],
                           "wall_s": new["wall_s"], "collected": new["collected"], "counts": new["counts"],
                           "note": note})
    for case, r in new["cases"].items():
        old = record["cases"].get(case)
        record["cases"][case] = {**r, "run": run, **({"before": old["outcome"]} if old else {})}
    record["counts_latest"] = outcome_counts(record["cases"].values())
    return record


def merge_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="run_gpu_isolated.py merge",
                                 description="add a --out result to a card's record as one run")
    ap.add_argument("record")
    ap.add_argument("result")
    ap.add_argument("--run", required=True, help="the run's letter in the record (the next unused one)")
    ap.add_argument("--code", required=True, help="the commit (and defaults) the run tested")
    ap.add_argument("--note", required=True, help="what the run covered and why")
    ap.add_argument("--date", default=None, help="when it ran (default: now, UTC)")
    args = ap.parse_args(argv)
    with open(args.record) as f:
        record = json.load(f)
    with open(args.result) as f:
        new = json.load(f)
    try:
        merge(record, new, args.run, args.code, args.note, args.date)
    except ValueError as exc:
        ap.error(str(exc))
    tmp = args.record + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.record)
    print(f"run {args.run}: {new['counts']}; latest over {len(record['cases'])} cases: {record['counts_latest']}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("-k", dest="kexpr")
    ap.add_argument("--group-timeout", type=float, default=1800)
    ap.add_argument("--case-timeout", type=float, default=300)
    ap.add_argument("--jobs", type=int, default=1, help="pytest processes at once (default 1)")
    ap.add_argument("--shard-size", type=int, default=10**9, help="most cases per process (default: a whole group)")
    ap.add_argument("--skip-passed", metavar="JSON", nargs="+", default=[],
                    help="leave out the cases any of these earlier records (--out files, or merged ones with the "
                         "same 'cases' map, e.g. one per card) has as passed: a later call runs what is left")
    args = ap.parse_args(argv)
    try:
        import torch
        card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        versions = {"torch": torch.__version__}
        try:
            import triton
            versions["triton"] = triton.__version__
        except ImportError:
            pass
    except ImportError:
        card, versions = "unknown", {}
    nodes = collect(args.files, args.kexpr)
    if args.skip_passed:
        passed = set()
        for path in args.skip_passed:
            with open(path) as f:
                passed |= {n for n, c in json.load(f).get("cases", {}).items() if c.get("outcome") == "passed"}
        kept = [n for n in nodes if n not in passed]
        print(f"--skip-passed: {len(nodes) - len(kept)} of {len(nodes)} cases passed before; running {len(kept)}",
              flush=True)
        nodes = kept
    groups: "OrderedDict[str, list[str]]" = OrderedDict()
    for n in nodes:
        groups.setdefault(group_of(n), []).append(n)
    shards = [(g, members[i:i + args.shard_size]) for g, members in groups.items()
              for i in range(0, len(members), args.shard_size)]
    results, t0, lock = {}, time.time(), threading.Lock()

    def run_shard(shard):
        g, members = shard
        outcomes, log = run_nodes(members, args.group_timeout)
        poisoned = bool(POISON.search(log)) or any(match(n, outcomes) is None for n in members)
        done = {}
        if poisoned:  # one case per process: which ones fail on their own
            print(f"[isolate] {g}: CUDA error or missing outcomes, re-running {len(members)} cases one by one",
                  flush=True)
            for n in members:
                o, log1 = run_nodes([n], args.case_timeout)
                r = match(n, o) or {"outcome": "crashed", "message": log1[-400:], "seconds": None}
                done[n] = {**r, "isolated": True}
        else:
            for n in members:
                done[n] = {**match(n, outcomes), "isolated": False}
        counts = outcome_counts(done.values())
        with lock:
            results.update(done)
            print(f"{g} ({len(members)} cases): {counts}", flush=True)
            write(args, card, versions, argv, t0, results, len(nodes))  # after every shard: a time limit keeps what ran

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(run_shard, shards))
    total = write(args, card, versions, argv, t0, results, len(nodes))
    print(" ".join(f"{v} {k}" for k, v in sorted(total.items())), "on", card)  # keeps what ran
    bad = sum(v for k, v in total.items() if k not in ("passed", "skipped"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(merge_main(sys.argv[2:]) if sys.argv[1:2] == ["merge"] else main())
