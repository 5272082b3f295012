"""Per-step time of the trial engines (eager vs CUDA graph) on the parity arm of paper_expressivity.

    python -m hqlt.benchmarks.engine --json engine_h200.json       # CUDA: the preset's arms at batch 1024
    python -m hqlt.benchmarks.engine --tiny                        # a tiny CPU run (smoke test; the default on CPU)

Arms (search_space/presets/paper_expressivity.yaml, task parity, lengths 3..40 -> T = 39; d 128, 2 layers, 4
heads, batch 1024, lr 5e-3, bf16 autocast): Sync-HQLT W 8 (H), DeltaNet beta in (0, 1) (F), Transformer (K).
For each arm and engine the trainer's loop is timed as `trainer.train` runs it: the next batch from the prefetching
`BatchStream`, `engine.step`, and the engine's flush (eager: every step; graph: every `log_every` = 10 steps), with
a device synchronisation at the end of the timed steps. Columns:

    loop ms     wall time per step of that loop (after --warmup steps, which include the graph's warm-up and capture)
    kernel ms   GPU kernel time per step: the sum of the CUDA kernel times that torch.profiler records over
                --profile-steps steps (memcpy / memset reported apart), divided by the steps
    host-bound  loop ms / kernel ms (1.0 = the GPU never waits for the host)

On CPU the engines are eager and static (the graph's code path without capture) and the kernel column is empty.
Results also go to --json (with the device, torch version and configs).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from importlib.resources import files

import numpy as np
import torch
import yaml

from hqlt.blocks import HybridLM
from hqlt.orchestration import trainer
from hqlt.orchestration.prefetch import BatchStream
from hqlt.orchestration.tasks import make_task
from hqlt.orchestration.trial_config import trial_config

ARMS = {"sync_hqlt": 3, "deltanet": 1, "transformer": 0}  # index in the preset's space.model.choice
TINY_MODEL = {"d_model": 16, "n_layers": 1, "n_heads": 2}


def preset_configs(arms, tiny: bool, batch_size: int | None) -> dict[str, dict]:
    """Trial configs (plain dicts) of the chosen arms of paper_expressivity, task parity."""
    spec = yaml.safe_load(files("hqlt.search_space").joinpath("presets/paper_expressivity.yaml").read_text())
    choices = spec["space"]["model"]["choice"]
    out = {}
    for name in arms:
        model = json.loads(json.dumps(choices[ARMS[name]]))
        train = dict(spec["base"]["train"])
        task = {"name": "parity", "eval_size": 64}
        if tiny:
            model.update(TINY_MODEL)
            train["batch_size"] = 8
        if batch_size:
            train["batch_size"] = batch_size
        out[name] = {"model": model, "task": task, "train": train, "probe": {"enabled": False}}
    return out


def kernel_ms(prof, steps: int) -> tuple[float, float]:
    """(kernel, memcpy+memset) device milliseconds per step from a torch.profiler run."""
    kern = other = 0.0
    for e in prof.events():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()  # a device-side event (kernel, memcpy, memset): its duration
        if e.name.startswith(("Memcpy", "Memset")) or "memcpy" in e.name.lower() or "memset" in e.name.lower():
            other += us
        else:
            kern += us
    return kern / 1e3 / steps, other / 1e3 / steps


def measure(plain: dict, engine: str, device: torch.device, *, warmup: int, steps: int, profile_steps: int,
            log_every: int = 10) -> dict:
    cfg = trial_config({**plain, "train": {**plain["train"], "engine": engine, "log_every": log_every,
                                           "steps": warmup + steps + profile_steps}})
    task = make_task("parity", cfg.task_config)
    cfg.model.vocab_size = task.vocab_size
    torch.manual_seed(0)
    model = HybridLM(cfg.model).to(device)
    tc = cfg.train
    eng = trainer.make_engine(model, tc, device, seq_len=task.train_seq_len)
    stream = BatchStream(task, tc.batch_size, np.random.default_rng([0, 0]), count=tc.steps, device=device)
    cuda = device.type == "cuda"
    state = {"step": 0}

    def run(n: int) -> None:
        for _ in range(n):
            s = state["step"]
            eng.step(stream.next(), s)
            if eng.sync_every_step or (s + 1) % log_every == 0:
                eng.flush(s + 1)
            state["step"] += 1

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    try:
        t0 = time.perf_counter()
        run(warmup)
        sync()
        warm_s = time.perf_counter() - t0
        per = []
        for _ in range(max(1, steps // 10)):  # blocks of ~10 steps: a median over blocks, each ending in a sync
            n = min(10, steps)
            t0 = time.perf_counter()
            run(n)
            sync()
            per.append((time.perf_counter() - t0) / n)
        row = {"engine": eng.name, "loop_ms": 1e3 * statistics.median(per), "loop_ms_min": 1e3 * min(per),
               "warmup_s": warm_s, **{k: v for k, v in eng.metrics().items() if k != "trial/engine"}}
        if cuda and profile_steps:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run(profile_steps)
                sync()
            row["kernel_ms"], row["memcpy_ms"] = kernel_ms(prof, profile_steps)
            row["host_bound"] = row["loop_ms"] / row["kernel_ms"] if row["kernel_ms"] else None
        if cuda:
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["params"] = model.num_params()
        return row
    finally:
        stream.close()


def _cell(value, width: int) -> str:
    return (f"{value:.2f}" if isinstance(value, (int, float)) else "-").rjust(width)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--engines", nargs="+", default=None, help="default: eager graph (CUDA), eager static (CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's 1024 (tiny: 8)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 20; tiny 4)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 100; tiny 10)")
    ap.add_argument("--profile-steps", type=int, default=20, help="steps under torch.profiler (CUDA)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and batches (the default without CUDA)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    tiny = args.tiny or device.type != "cuda"
    engines = args.engines or (["eager", "graph"] if device.type == "cuda" else ["eager", "static"])
    warmup = args.warmup if args.warmup is not None else (4 if tiny else 20)
    steps = args.steps if args.steps is not None else (10 if tiny else 100)
    configs = preset_configs(args.arms, tiny, args.batch_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    bs = next(iter(configs.values()))["train"]["batch_size"]
    print(f"# trial engines, parity arm of paper_expressivity{' (tiny)' if tiny else ''}: batch {bs}, T 39; "
          f"{device} {name}, torch {torch.__version__}; median of {steps} steps after {warmup}")
    print(f"{'arm':<12} {'engine':<7} {'loop ms':>8} {'kernel ms':>10} {'host-bound':>10} {'capture s':>10} {'vs eager':>9}")
    rows = []
    for arm, plain in configs.items():
        eager_ms = None
        for engine in engines:
            try:
                row = {"arm": arm, **measure(plain, engine, device, warmup=warmup, steps=steps,
                                              profile_steps=args.profile_steps if device.type == "cuda" else 0)}
            except Exception as exc:  # noqa: BLE001 — one arm's failure is a row, not the end of the run
                row = {"arm": arm, "engine": engine, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            rows.append(row)
            if "error" in row:
                print(f"{arm:<12} {engine:<7} error: {row['error']}", flush=True)
                continue
            if row["engine"] == "eager":
                eager_ms = row["loop_ms"]
            speed = eager_ms / row["loop_ms"] if eager_ms and row["engine"] != "eager" else None
            print(f"{arm:<12} {row['engine']:<7} {row['loop_ms']:>8.2f} {_cell(row.get('kernel_ms'), 10)} "
                  f"{_cell(row.get('host_bound'), 10)} {_cell(row.get('time/graph_capture_s'), 10)} "
                  f"{_cell(speed, 8)}{'x' if speed else ' '}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": str(device), "device_name": name, "torch": torch.__version__,
                       "configs": configs, "results": rows}, f, indent=2, default=str)
    return rows


if __name__ == "__main__":
    main()
