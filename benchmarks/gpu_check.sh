#!/usr/bin/env bash
# One prepared run on a CUDA machine: the CUDA path end to end (checks), the whole service against
# the bare model (service), then the sd21 benchmark (bench). Writes logs and JSON under $OUT
# (default ./bench-results).
# Usage: bash benchmarks/gpu_check.sh [checks|service|bench|all]   (default all)
set -uo pipefail
what=${1:-all}
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
py=${PYTHON:-python3}
work=$(mktemp -d)

checks() {
  echo "== CUDA path: CLI on a real photo, compact and sd21-tiny, fp16/bf16, vs CPU fp32 =="
  $py -m ctsr.cli model init --arch compact "$work/compact"
  $py -m ctsr.cli model init --arch sd21 --preset sd21-tiny "$work/tiny"
  for dt in fp16 bf16; do
    $py -m ctsr.cli upscale tests/data/seeding_96x72.jpg -o "$work/out-$dt" --model "$work/compact" \
      --device cuda --dtype $dt --alpha 0 --alpha 1 --tile 48 || echo "FAILED compact $dt"
    $py -m ctsr.cli upscale tests/data/seeding_96x72.jpg -o "$work/tiny-$dt" --model "$work/tiny" \
      --device cuda --dtype $dt --alpha 0.5 --tile 32 || echo "FAILED sd21-tiny $dt"
  done
  $py -m ctsr.cli upscale tests/data/seeding_96x72.jpg -o "$work/out-compiled" --model "$work/compact" \
    --device cuda --dtype fp16 --alpha 0 --alpha 1 --tile 48 --compile || echo "FAILED compact compiled"
  $py -m ctsr.cli upscale tests/data/seeding_96x72.jpg -o "$work/out-cpu" --model "$work/compact" \
    --device cpu --alpha 0 --alpha 1 --tile 48
  $py - "$work" <<'PY'
import sys
import numpy as np
from PIL import Image
w = sys.argv[1]
for run in ("fp16", "bf16", "compiled"):
    for a in ("0", "1"):
        x = np.asarray(Image.open(f"{w}/out-{run}/seeding_96x72_a{a}.png"), dtype=np.float32)
        y = np.asarray(Image.open(f"{w}/out-cpu/seeding_96x72_a{a}.png"), dtype=np.float32)
        d = np.abs(x - y)
        print(f"compact cuda {run} vs cpu fp32, alpha {a}: {x.shape}, mean |diff| {d.mean():.3f}/255, max {d.max():.0f}/255")
PY
  echo "== real CUDA out-of-memory: allocator capped at 4 GiB, 16 tiles of 512^2 LR per batch =="
  $py benchmarks/cuda_oom_check.py --cap-gib 4
  echo "== compact on CUDA, fp16, 512^2 out =="
  $py benchmarks/bench_model.py --family compact --device cuda --dtype fp16 --json "$OUT/compact_cuda.json"
}

service() {
  echo "== the whole service (ctsr serve + load generator on this machine) vs the bare model, CUDA fp16 =="
  echo "   (each twice: the batch finished on a thread while the next runs, the default here; then inline)"
  for m in compact rrdb; do
    $py benchmarks/bench_service.py --model $m --device cuda --dtype fp16 --side 128 --max-batch 16 \
      --seconds 15 --json "$OUT/service_cuda_$m.json"
    CTSR_FINISH_IN_BACKGROUND=false $py benchmarks/bench_service.py --model $m --device cuda --dtype fp16 \
      --side 128 --max-batch 16 --seconds 15 --json "$OUT/service_cuda_${m}_inline.json"
  done
}

bench() {
  echo "== sd21 (full SD-2.1-base shapes, random weights), fp16, 512^2 out =="
  $py benchmarks/bench_model.py --family sd21 --device cuda --dtype fp16 --json "$OUT/sd21_eager.json"
  $py benchmarks/bench_model.py --family sd21 --device cuda --dtype fp16 --batches 16 \
    --compile-batch 16 --json "$OUT/sd21_compile.json"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
  case $what in
    checks) checks ;;
    service) service ;;
    bench) bench ;;
    *) checks; service; bench ;;
  esac
} 2>&1 | tee "$OUT/gpu_check_$what.log"
rm -rf "$work"
