#!/usr/bin/env bash
# The two published-results sweeps of reports/results/README.md, on one multi-GPU host, through `hqlt sweep`.
# Run from the repository root; rerunning the same line on the same folder resumes it (also after the
# folder was copied to another host). Shortened from the paper's 20k steps to fit the GPU time we had:
#   EXPR_STEPS (default 3000)   training steps of each expressivity run (published: 20000)
#   EXPR_LIMIT, MQAR_LIMIT      seconds; if set, that sweep gets SIGINT after that long (it stops cleanly
#                               and the next run of this script resumes it; how the resume test was run)
#   EXPR_FRESH=1                discard an existing paper_expressivity folder and start it anew (--fresh)
#   DEADLINE                    epoch seconds; if set, each sweep also gets SIGINT at that time
#   SWEEPS                      folder holding both sweep folders (default: sweeps)
set -u
limit() {  # limit SECONDS|'' CMD...: CMD, stopped by SIGINT after SECONDS and at DEADLINE, whichever is first
  local s=$1; shift
  if [ -n "${DEADLINE:-}" ]; then
    local left=$(( DEADLINE - $(date +%s) ))
    [ "$left" -le 5 ] && { echo "deadline reached, skipping: $*"; return 124; }
    if [ -z "$s" ] || [ "$left" -lt "$s" ]; then s=$left; fi
  fi
  if [ -n "$s" ]; then timeout -s INT "$s" "$@"; else "$@"; fi
}
SWEEPS=${SWEEPS:-sweeps}
EXPR_STEPS=${EXPR_STEPS:-3000}
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
# 12 trials on 4 GPUs: a third of a GPU each puts all of them on the cards at once
limit "${EXPR_LIMIT:-}" hqlt sweep search_space/presets/paper_expressivity.yaml --dir "$SWEEPS/paper_expressivity" \
  --verbose 0 ${EXPR_FRESH:+--fresh} \
  base.train.steps=$EXPR_STEPS base.train.warmup_steps=$((EXPR_STEPS / 10)) base.train.eval_every=500 \
  sweep.resources.gpu=0.33
limit "${MQAR_LIMIT:-}" hqlt sweep search_space/presets/mqar_windows.yaml --dir "$SWEEPS/mqar_windows" \
  --verbose 0
