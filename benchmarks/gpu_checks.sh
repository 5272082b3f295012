#!/usr/bin/env bash
# The GPU measurements the open work still needs, in priority order, each capped in time so that one call on a
# fresh machine returns what it got. Run from the repository root on a CUDA machine with the project installed:
#
#   benchmarks/gpu_checks.sh OUT_DIR [STAGE ...]        (default: every stage, in the order below)
#
# Stages (results under OUT_DIR; caps in seconds can be changed with CAP_<STAGE>=..., e.g. CAP_PROBE_SWEEP=600):
#   fused_sanitizer  compute-sanitizer on the fused cases at head dims 24 / 40 (the ones that faulted), both FW
#                    backward variants, features given and computed in the kernel
#   op_watch         the fused op called in eager mode after the other fused paths, and the fused-backward cases
#                    where the dispatcher failed, in one pytest process, with every redefinition or destruction of
#                    an hqlt:: op logged with its stack (op_watch.log; kernels/FUSED_NOTES.md "Round 5")
#   gpu_tests        the GPU suites (engine, fused, backends; $GPU_TEST_FILES, cases $GPU_TEST_K), several isolated
#                    pytest processes at once ($GPU_TEST_JOBS, default 8, of $GPU_TEST_SHARD cases, default 6; the
#                    op watch on); the record is OUT/$GPU_TEST_NAME.json (default gpu_suite)
#   fused_bench      fused (single vs split FW backward) vs the fla composition vs SDPA, 8x2048 and 1x32768
#   fused_ab         launch configurations against each other, the GPU kernel time per fwd+bwd step under
#                    torch.profiler (`python -m hqlt.benchmarks.fused_ab --timer kernels --sdpa`; $AB_TIMER, e.g.
#                    graph: the step replayed from a CUDA graph, as the graph engine runs it): $AB_CONFIGS, one
#                    JSON object per line (default: the defaults; round 20's candidates, FUSED_NOTES.md "Round
#                    20"; the round-15 values of the round-19 defaults), at $AB_ROWS (default 2048:8x128:64
#                    32768:8x128:64 2048:16x64:64)
#   fused_ab_scans   as fused_ab, the scans' 64-column candidates at B 8, T 2048, 8x128 (OUT/fused_ab_scans.json)
#   table            the twelve sync rows of the auto table (fla vs fused, 8x128 and 16x64, W 64 and 1024, T 2048,
#                    8192, 32768) with --write-auto-table; the updated kernels/results/auto_table.json is copied
#                    to OUT_DIR/auto_table.json, the timings to bench_kernels.json
#   fused_profile    Nsight Compute on the fused kernels that walk the chunks in sequence (the two scans and the
#                    FW/WY backward; $PROFILE_KERNELS, a regex) at $PROFILE_SHAPES (default 8x2048 1x32768), the
#                    last of 3 steps of `python -m hqlt.benchmarks.fused_profile` ($PROFILE_ARGS passed on, split
#                    at spaces, e.g. PROFILE_ARGS='--config {"scan_features":"stored"}'); the report of each shape
#                    in ncu_<shape>.txt
#   probe_sweep      probe_340m preset (cost probe at 340M, measured alone) + `hqlt bench model --compile off`
#   engine_sweep     paper_expressivity at 300 steps, 1 seed, eager vs graph: trials per GPU-hour, GPU busy
#   mps_sweep        the same graph sweep with an MPS control daemon running for it (own pipe folder, stopped
#                    after): the 4 trials sharing the card run their kernels side by side instead of in turns
#   compile_bench    `hqlt bench model --compile on` (custom ops: no graph breaks in the HQLT blocks)
#   recipe           the published-budget preset $RECIPE (e.g. hqlt_recipe_parity), resumed from the committed
#                    folder reports/results/$RECIPE when there is one, stopped by SIGINT at its cap, or as soon
#                    as a seed has finished and another would not finish before the cap (it stays resumable; the
#                    rest of the call is handed back); its archive is $RECIPE.tgz: unpack it into reports/results/$RECIPE and commit it.
#                    $RECIPE_ARGS are passed on (e.g. sweep.resources.gpu=1)
#
# One Triton cache for all stages (OUT_DIR/triton): fla autotunes every new kernel shape for minutes on a fresh
# machine, so later stages reuse what earlier ones compiled; the sweeps use it too (a TRITON_CACHE_DIR set in the
# environment replaces the sweep folder's cache/), so the bench after the probe sweep loads the probe's autotuning.
set -u
OUT=${1:?usage: benchmarks/gpu_checks.sh OUT_DIR [STAGE ...]}
shift
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGES=${*:-fused_sanitizer op_watch gpu_tests fused_bench probe_sweep engine_sweep mps_sweep compile_bench}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$OUT/triton} TRITON_CACHE_AUTOTUNING=1 PYTHONUNBUFFERED=1
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"

keep() {  # keep DIR: the sweep folder as one archive in OUT, its compile cache left out (results, MLflow database,
  # study journal, Ray's state, report, GPU samples): unpacked, `hqlt report` reads it and `hqlt sweep` resumes it.
  # One file, because the device tool returns no folder nested as deep as Ray's trial folders.
  tar czf "$OUT/$(basename "$1").tgz" -C "$1" --exclude=./cache . 2>/dev/null
}

expr_sweep() {  # expr_sweep ENGINE CAP NAME: paper_expressivity, 300 steps, 1 seed, with train.engine ENGINE
  timeout -s INT "$2" hqlt sweep search_space/presets/paper_expressivity.yaml \
    --dir "$OUT/sweeps/expr_$3" --fresh --verbose 0 sweep.name="expr_engine_$3" sweep.seeds=1 \
    base.train.engine=$1 base.train.steps=300 base.train.warmup_steps=30 base.train.eval_every=300 \
    base.task.eval_size=2048 2>&1 | tee "$OUT/engine_sweep_$3.log" | tail -12
  keep "$OUT/sweeps/expr_$3"
}

sweep_until() {  # sweep_until CAP LOG SPEC --dir DIR [ARGS]: `hqlt sweep`, stopped resumably (SIGINT) at CAP seconds.
  # A sweep without seed snapshots (sweep.snapshot_minutes null) loses an unfinished seed, so it stops sooner: when a
  # seed has just finished and another one as long (its time/train_s + 30 s) would not end before CAP, the sweep stops
  # then and the rest of the call is handed back. With snapshots the next run goes on from the last one.
  local cap=$1 log=$2 dir=$5 t0 pid seen n now need snapshots
  shift 2
  snapshots=$(python -c "import sys; from hqlt.search_space import load_spec; from hqlt.orchestration.space_hooks import HOOKS; \
a = sys.argv[1:]; o = [x for x in a[1:] if '=' in x and not x.startswith('-')]; \
print(int(load_spec(a[0], o, hooks=HOOKS).sweep.snapshot_minutes is not None))" "$@" 2>/dev/null || echo 0)
  t0=$(date +%s)
  hqlt sweep "$@" > "$log" 2>&1 &
  pid=$!
  seen=$(find "$dir/results" -name '*.seed*.json' 2>/dev/null | wc -l)
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    now=$(( $(date +%s) - t0 ))
    if [ "$now" -ge "$cap" ]; then echo "cap of $cap s reached: stopping the sweep"; kill -INT "$pid"; break; fi
    [ "$snapshots" = 1 ] && continue
    n=$(find "$dir/results" -name '*.seed*.json' 2>/dev/null | wc -l)
    [ "$n" -gt "$seen" ] || continue
    seen=$n
    need=$(python -c "import glob, json, os; f = max(glob.glob('$dir/results/*.seed*.json'), key=os.path.getmtime); \
print(int(json.load(open(f))['result']['metrics'].get('time/train_s', 0)) + 30)")
    if [ $(( now + need )) -gt "$cap" ]; then
      echo "seed record $n at $now s; another seed needs about $need s, past the $cap s cap: stopping the sweep now"
      kill -INT "$pid"
      break
    fi
  done
  wait "$pid"
}

fused_ab_run() {  # fused_ab_run NAME CAP CONFIGS ROWS: `python -m hqlt.benchmarks.fused_ab` with the SDPA baseline,
  # one pass, CONFIGS one JSON object per line, ROWS split at spaces; OUT/NAME.json and OUT/NAME.log
  local name=$1 c=$2 configs
  mapfile -t configs <<< "$3"
  # shellcheck disable=SC2086  # the rows are split at spaces
  timeout "$c" python -m hqlt.benchmarks.fused_ab --timer "${AB_TIMER:-kernels}" --sdpa --passes 1 \
    --budget-s $(( c - 30 )) --out "$OUT/$name.json" --configs "${configs[@]}" --rows $4 2>&1 \
    | tee "$OUT/$name.log" | tail -40
}

cap() {  # cap STAGE DEFAULT: the stage's time cap
  local var="CAP_$(echo "$1" | tr '[:lower:]' '[:upper:]')"
  echo "${!var:-$2}"
}

for stage in $STAGES; do
  echo "== $stage at $(( $(date +%s) - T0 )) s"
  case $stage in
    fused_sanitizer)
      timeout "$(cap $stage 150)" compute-sanitizer --tool memcheck --print-limit 20 python -m pytest -q -m gpu \
        -p no:cacheprovider tests/test_gpu_fused.py -k "TestGPUFwBwdVariants and case2" \
        > "$OUT/sanitizer.log" 2>&1
      grep -E "Invalid|Out-of-range|at .*\.py:[0-9]+|passed|failed" "$OUT/sanitizer.log" | head -20 ;;
    op_watch)
      HQLT_OP_WATCH="$OUT/op_watch.log" timeout "$(cap $stage 400)" python -m pytest -q -m gpu -p no:cacheprovider \
        tests/test_gpu_fused.py -k "TestGPUOpAfterOtherPaths or (TestGPUFusedBackward and T130)" 2>&1 | tail -8
      grep -E "^== |NOT LIVE" "$OUT/op_watch.log" | head -20 ;;
    gpu_tests)
      # $GPU_TEST_FILES is split at spaces into file names; $GPU_TEST_K selects cases (pytest -k); the record goes to
      # OUT/$GPU_TEST_NAME.json (default gpu_suite), so that two runs in one call keep both
      name=${GPU_TEST_NAME:-gpu_suite}
      HQLT_OP_WATCH="$OUT/${name}_op_watch.log" timeout "$(cap $stage 900)" python tests/run_gpu_isolated.py \
        ${GPU_TEST_FILES:-tests/test_gpu_engine.py tests/test_gpu_fused.py tests/test_gpu_backends.py} \
        ${GPU_TEST_K:+-k "$GPU_TEST_K"} --out "$OUT/$name.json" --jobs "${GPU_TEST_JOBS:-8}" \
        --shard-size "${GPU_TEST_SHARD:-6}" --case-timeout 150 | tail -40 ;;
    fused_bench)
      timeout "$(cap $stage 300)" python -m hqlt.benchmarks.fused --shapes 8x2048 1x32768 --no-sweep \
        --out "$OUT/bench_fused.json" | tail -40 ;;
    fused_ab)
      fused_ab_run "fused_ab${AB_TIMER:+_$AB_TIMER}" "$(cap $stage 300)" "${AB_CONFIGS:-$(printf '%s\n' '{}' \
        '{"fw_bwd_u": "fwd"}' '{"fw_bwd_u": "fwd", "fw_bwd_wy_warps": 8}' '{"out_warps": 8}' '{"wy_warps": 8}' \
        '{"wy_parts": 2}' '{"out_order": "chunk", "fw_bwd_dk_maxnreg": 0}')}" \
        "${AB_ROWS:-2048:8x128:64 32768:8x128:64 2048:16x64:64}" ;;
    fused_ab_scans)
      # the scans' 64-column candidates at the one row where their programs fill the SMs in one wave (FUSED_NOTES.md
      # "Round 20"): B 8, T 2048, 8 x 128; with fewer B x H the default halves the columns instead
      fused_ab_run "fused_ab_scans${AB_TIMER:+_$AB_TIMER}" "$(cap $stage 200)" "$(printf '%s\n' '{}' \
        '{"scan_bv": 64, "scan_warps": 8}' '{"bwd_scan_bv": 64, "bwd_scan_warps": 8}' \
        '{"scan_bv": 64, "scan_warps": 8, "bwd_scan_bv": 64, "bwd_scan_warps": 8}')" 2048:8x128:64 ;;
    table)
      c=$(cap $stage 450)
      timeout "$c" hqlt bench kernels --blends sync --backends fla fused --windows 64 1024 --pairs 2048:8x128 \
        8192:8x128 32768:8x128 2048:16x64 8192:16x64 32768:16x64 --budget-s $(( c - 30 )) \
        --out "$OUT/bench_kernels.json" --write-auto-table 2>&1 | tail -40
      cp kernels/results/auto_table.json "$OUT/auto_table.json" ;;
    fused_profile)
      kernels=${PROFILE_KERNELS:-scan_kernel|bwd_scan_kernel|fw_bwd_wy_kernel}
      n=$(echo "$kernels" | tr '|' '\n' | wc -l)   # --launch-skip counts the launches that match the filter
      for shape in ${PROFILE_SHAPES:-8x2048 1x32768}; do
        timeout "$(cap $stage 300)" ncu --clock-control none --kernel-name "regex:^($kernels)\$" \
          --launch-skip $(( 2 * n )) --launch-count "$n" --section SpeedOfLight --section Occupancy \
          --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
          python -m hqlt.benchmarks.fused_profile --shape "$shape" --steps 3 ${PROFILE_ARGS:-} \
          > "$OUT/ncu_$shape.txt" 2>&1
        grep -E "^  [a-z_]+kernel|Duration|Registers Per Thread|Achieved Occupancy|Compute \(SM\) Throughput|Memory Throughput|Warp Cycles Per Issued|No Eligible" \
          "$OUT/ncu_$shape.txt" | head -60
      done ;;
    probe_sweep)
      timeout -s INT "$(cap $stage 600)" hqlt sweep search_space/presets/probe_340m.yaml --dir "$OUT/sweeps/probe_340m" \
        --fresh --verbose 0 2>&1 | tee "$OUT/probe_sweep.log" | tail -20
      hqlt report "$OUT/sweeps/probe_340m" --no-log | tail -20
      keep "$OUT/sweeps/probe_340m"
      timeout "$(cap bench_model 400)" hqlt bench model --compile off --out "$OUT/bench_model_eager.json" | tail -6 ;;
    engine_sweep)
      for engine in ${ENGINES:-eager graph}; do expr_sweep $engine "$(cap $stage 400)" "$engine"; done ;;
    mps_sweep)
      if ! command -v nvidia-cuda-mps-control >/dev/null; then echo "no nvidia-cuda-mps-control here"; continue; fi
      export CUDA_MPS_PIPE_DIRECTORY=/tmp/hqlt-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/hqlt-mps/log
      mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
      nvidia-cuda-mps-control -d && echo "MPS control daemon started"
      expr_sweep graph "$(cap $stage 300)" graph_mps
      echo quit | nvidia-cuda-mps-control
      unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY ;;
    recipe)
      name=${RECIPE:?set RECIPE to a preset name, e.g. RECIPE=hqlt_recipe_parity}
      mkdir -p "$OUT/sweeps"
      if [ -f "reports/results/$name/sweep.json" ]; then
        cp -r "reports/results/$name" "$OUT/sweeps/$name" && echo "resuming reports/results/$name"
      fi
      sweep_until "$(cap $stage 540)" "$OUT/recipe_$name.log" "search_space/presets/$name.yaml" --dir "$OUT/sweeps/$name" \
        --verbose 0 ${RECIPE_ARGS:-}
      tail -25 "$OUT/recipe_$name.log"
      hqlt status "$OUT/sweeps/$name" 2>&1 | tail -15
      keep "$OUT/sweeps/$name" ;;
    compile_bench)
      timeout "$(cap $stage 600)" hqlt bench model --compile on --out "$OUT/bench_model_compiled.json" | tail -6 ;;
    *) echo "unknown stage $stage; stages: fused_sanitizer op_watch gpu_tests fused_bench fused_ab fused_ab_scans table" \
         "fused_profile probe_sweep engine_sweep mps_sweep compile_bench recipe"
       exit 2 ;;
  esac
done
echo "== done at $(( $(date +%s) - T0 )) s"
