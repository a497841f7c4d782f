#!/bin/bash
# The 2,000-step probes of session 38, as run: the bundled recipe at --max-steps 2000 and --verdict-samples 1,
# on a copy of the repository at 21938d0 with ../probe_knobs.diff applied (VC_TB_LR scales the token-bias table's
# learning rate, VC_TB_WD sets its weight decay). Set SNAP to that copy; runs go to $OUT/<name>.
SNAP=${SNAP:?a copy of the repository at 21938d0 with probe_knobs.diff applied}; OUT=${OUT:-/tmp/probe}
cd "$SNAP" && export PYTHONPATH="$SNAP"
run() { name=$1; flags=$2; shift 2
  env "$@" python -m virtualcell.cli train --data papalexi2021 --perturbation-key perturbation --control control --holdout bio_rep=rep_3 --kind knockout --top-k 100 --hidden-size 128 --layers 4 --heads 4 --lr 3e-3 --batch-size 16 --max-steps 2000 --max-minutes 30 --verdict-samples 1 --no-target-offsets --seed 0 --threads 1 $flags --out $OUT/$name > $OUT/$name.log 2>&1; }
mkdir -p "$OUT"
run tb1 "" VC_TB_LR=1
run notb --no-token-bias VC_TB_LR=1

run tb025 "" VC_TB_LR=0.25
run tb01 "" VC_TB_LR=0.1  # stopped unfinished (session time)
