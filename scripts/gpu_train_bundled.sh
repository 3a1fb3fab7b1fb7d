#!/usr/bin/env bash
# Trains the bundled compact model on a lent GPU machine (run from the repo root there).
#   bash scripts/gpu_train_bundled.sh all SECONDS       pairs, fidelity teacher, stage 1, stage 2
#   bash scripts/gpu_train_bundled.sh stage1 SECONDS    pairs + stage 1 only (no fidelity teacher needed)
#   bash scripts/gpu_train_bundled.sh stage2 SECONDS    stage 2 on the same machine's pairs
# Carried inputs: .carry/photos (train split + manifest.json, from `ctsr data fetch`),
# .carry/realesrgan-x4plus.safetensors (the converted teacher), optionally .carry/stage1-init/
# (a checkpoint to start stage 1 from) and .carry/fidelity/ (a trained fidelity teacher).
set -uo pipefail
PHASE=${1:-all}
BUDGET=${2:-330}
OUT=${OUT:-/tmp/out}
WORK=/tmp/ctsr-work
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 CTSR_REALESRGAN_WEIGHTS=$PWD/.carry/realesrgan-x4plus.safetensors
args=(--photos .carry/photos --work "$WORK" --count 2000 --seconds "$BUDGET" --device cuda)
[ -d .carry/stage1-init ] && args+=(--stage1-init .carry/stage1-init)
[ -d .carry/fidelity ] && args+=(--fidelity-teacher .carry/fidelity)
case $PHASE in
  all) ;;
  stage1) args+=(--stages stage1) ;;
  stage2) args+=(--stages stage2) ;;
esac
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout $((BUDGET + 150)) python3 -m models.training.recipe "${args[@]}" 2>&1 \
  | grep -v -E "it/s\]|step/s\]|pair/s\]" | tee "$OUT/train-$PHASE.log"
if [ "$PHASE" != stage1 ]; then
  python3 - "$WORK" <<'PY'
import sys
from pathlib import Path

import torch

work = Path(sys.argv[1])
final = work / "fidelity-teacher" / "final"
if (final / "model.safetensors").is_file():
    from models.teachers.fidelity import FidelityTeacher

    FidelityTeacher.from_pretrained(final).save_pretrained(work / "fidelity-fp16", dtype=torch.float16)
PY
  tar -C "$WORK" -cf "$OUT/runs.tar" --exclude='checkpoint-*' --exclude='pairs' --exclude='fidelity-teacher/final' \
    --exclude='fidelity-fp16/model.safetensors' recipe.json stage1 stage2 fidelity-teacher fidelity-fp16 2>/dev/null
  if [ -f "$WORK/fidelity-fp16/model.safetensors" ]; then
    split -b 15M "$WORK/fidelity-fp16/model.safetensors" "$OUT/fidelity.part-"
  fi
fi
ls -la "$OUT"
