#!/usr/bin/env bash
# The reproduction of docs/results.md: ISGD against SGD on MNIST and Fashion-MNIST, and the
# ablations. Long (hours on 2 CPU cores): run it in the background and read the reports.
#
#   bash scripts/reproduce.sh [main|fashion|ablations|bn|all]   (default: all)
#
# Every comparison writes runs/repro-*/report.md, summary.json, runs.jsonl and figures/.
# THREADS=1 by default so two comparisons can share a 2-core machine; SEEDS=5 for recorded results.
set -euo pipefail
cd "$(dirname "$0")/.."
ISGD=${ISGD:-.venv/bin/isgd}
THREADS=${THREADS:-1}
SEEDS=${SEEDS:-5}
ABLATION_SEEDS=${ABLATION_SEEDS:-3}
COMMON=(--preset lenet-mnist --threads "$THREADS" --eval-every 250 --no-progress)
what=${1:-all}

if [[ $what == main || $what == all ]]; then  # claim C3 on MNIST, target 99.0 %
  $ISGD compare "${COMMON[@]}" --seeds "$SEEDS" --target 0.99 --equal-compute \
    --out runs/repro-mnist
fi
if [[ $what == fashion || $what == all ]]; then  # same harness on Fashion-MNIST
  $ISGD compare "${COMMON[@]}" --dataset fashion-mnist --seeds "$SEEDS" --target 0.89 \
    --out runs/repro-fashion
fi
if [[ $what == ablations || $what == all ]]; then  # MNIST: sigma_factor, stop, eps, FCPR
  $ISGD compare "${COMMON[@]}" --seeds "$ABLATION_SEEDS" --target 0.99 --out runs/repro-ablations \
    --arm sgd --arm isgd \
    --arm isgd-k2:optimizer=isgd,sigma_factor=2 \
    --arm isgd-stop1:optimizer=isgd,max_extra_iters=1 \
    --arm isgd-stop3:optimizer=isgd,max_extra_iters=3 \
    --arm isgd-stop10:optimizer=isgd,max_extra_iters=10 \
    --arm isgd-eps0:optimizer=isgd,eps=0 \
    --arm isgd-eps10:optimizer=isgd,eps=10 \
    --arm sgd-reshuffle:optimizer=sgd,reshuffle=true \
    --arm isgd-reshuffle:optimizer=isgd,reshuffle=true
fi
if [[ $what == bn || $what == all ]]; then  # BatchNorm statistics frozen or not in extra passes
  $ISGD compare "${COMMON[@]}" --model lenet-bn --seeds "$ABLATION_SEEDS" --target 0.99 \
    --out runs/repro-bn --arm sgd --arm isgd \
    --arm isgd-bn-unfrozen:optimizer=isgd,freeze_bn_stats=false
fi
