#!/usr/bin/env bash
# The GPU check (issue 21 §3): every CUDA path the CPU tests emulate, the overhead of a
# non-triggering step and its host-device synchronisations, a 2-process NCCL run on 2 GPUs.
# At most ~8 minutes on one GPU; writes gpu-check.json and gpu-check.md into --out
# (default $OUT if set, else runs/gpu-check-<time>). Without CUDA: one line, exit 0.
#
#   bash scripts/gpu-check.sh --out "$OUT"          # on the GPU machine
#   bash scripts/gpu-check.sh --device cpu          # the CPU smoke mode (every code path)
#   bash scripts/gpu-check.sh --only bf16-autocast,torch-compile --budget 120
#
# Python: $PYTHON if set, else the project's .venv, else python3; if the .venv's torch has no
# CUDA but python3's has (a CPU venv carried to a GPU machine), python3.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [[ -z $py ]]; then
  py=python3
  [[ -x $root/.venv/bin/python ]] && py=$root/.venv/bin/python
  cpu_mode=0
  for a in "$@"; do [[ $a == cpu || $a == --device=cpu ]] && cpu_mode=1; done
  has_cuda='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
  if [[ $cpu_mode == 0 && $py != python3 ]] && command -v python3 >/dev/null \
     && python3 -c "$has_cuda" 2>/dev/null && ! "$py" -c "$has_cuda" 2>/dev/null; then
    py=python3
  fi
fi
exec "$py" "$root/scripts/gpu_check.py" "$@"
