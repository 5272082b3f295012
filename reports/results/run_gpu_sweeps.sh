#!/usr/bin/env bash
# The two published-results sweeps of reports/results/README.md, on one multi-GPU host, through `hqlt sweep`.
# Run from the repository root; rerunning the same line on the same folder resumes it (also after the
# folder was copied to another host). Shortened from the paper's 20k steps to fit the GPU time we had:
#   EXPR_STEPS (default 3000)   training steps of each expressivity run (published: 20000)
#   STOP_AFTER                  seconds; if set, mqar_windows gets SIGINT after that long (resume test)
#   SWEEPS                      folder holding both sweep folders (default: sweeps)
set -u
SWEEPS=${SWEEPS:-sweeps}
EXPR_STEPS=${EXPR_STEPS:-3000}
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
# 12 trials on 4 GPUs: a third of a GPU each puts all of them on the cards at once
hqlt sweep search_space/presets/paper_expressivity.yaml --dir "$SWEEPS/paper_expressivity" --verbose 0 \
  base.train.steps=$EXPR_STEPS base.train.warmup_steps=$((EXPR_STEPS / 10)) base.train.eval_every=500 \
  sweep.resources.gpu=0.33
if [ -n "${STOP_AFTER:-}" ]; then
  timeout -s INT "$STOP_AFTER" hqlt sweep search_space/presets/mqar_windows.yaml --dir "$SWEEPS/mqar_windows" --verbose 0
else
  hqlt sweep search_space/presets/mqar_windows.yaml --dir "$SWEEPS/mqar_windows" --verbose 0
fi
