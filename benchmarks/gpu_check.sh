#!/usr/bin/env bash
# The first checks on a GPU, in a few minutes (nothing in bertexp has been measured on one before):
#   1. a default run on CUDA (trainer=smoke, device and precision auto): does it start, train, evaluate,
#      checkpoint and log throughput/mfu_measured and throughput/mfu_spec;
#   2. training throughput of bert_base, batch 256 x length 128, bf16, eager and compiled: tokens/s and MFU
#      against the timed bf16 matmul and against the GPU's dense bf16 data-sheet peak.
# Writes everything under $OUT (default outputs/gpu_check/) and prints a summary for docs/results.md.
#
#   bash benchmarks/gpu_check.sh              # STEPS=20 timed steps per benchmark
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-outputs/gpu_check}
steps=${STEPS:-20}
threads=${THREADS:-8}
mkdir -p "$out"
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible (torch %s, built for CUDA %s)" % (torch.__version__, torch.version.cuda))
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}")
PY
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "commit $commit, $(date -u +%Y-%m-%dT%H:%MZ)" | tee "$out/summary.txt"

echo "== 1. default run on CUDA (trainer=smoke)" | tee -a "$out/summary.txt"
rm -rf "$out/smoke"
python run.py trainer=smoke trainer.measure_mfu=true logger=none "hydra.run.dir=$out/smoke" 2>&1 | tee "$out/smoke.log" | tail -3
python - "$out/smoke/metrics.jsonl" <<'PY' | tee -a "$out/summary.txt"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in rows if "train/loss" in r]
last = train[-1]
print("smoke: steps %d, loss %.3f, tokens/s %.0f, mfu_measured %s, mfu_spec %s" % (
    last["step"], last["train/loss"], last.get("throughput/mean_tokens_per_s", float("nan")),
    *(f"{last[k]:.1%}" if k in last else "n/a" for k in ("throughput/mfu_measured", "throughput/mfu_spec"))))
PY

for mode in eager compile; do
  echo "== 2. bert_base 256 x 128 bf16, $mode" | tee -a "$out/summary.txt"
  python benchmarks/throughput.py --device cuda --model bert_base --batch-size 256 --max-length 128 --precision bf16 \
    --pipelines bertexp --steps "$steps" --warmup 5 --threads "$threads" $([ "$mode" = compile ] && echo --compile) \
    2>"$out/throughput_$mode.err" | tee "$out/throughput_$mode.md" | tee -a "$out/summary.txt"
done
echo "Summary: $out/summary.txt (for docs/results.md, with the commit and these commands)"
