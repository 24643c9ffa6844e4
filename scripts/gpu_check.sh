#!/usr/bin/env bash
# The prepared GPU check: one CUDA GPU, no network, at most ~8 minutes on an H100/H200; JSON and logs into OUT_DIR.
#   a) the GPU suite (tests/test_gpu.py): Qwen3-1.7B-shaped random model, Unsloth 4-bit load -> SFT -> GRPO -> merge
#      -> Unsloth save_pretrained_gguf Q4_K_M -> llama.cpp load + generate            -> gpu_suite.json/.log
#   b) Unsloth 4-bit QLoRA vs transformers + peft + bitsandbytes 4-bit QLoRA, same model/data/batch/length
#      (benchmarks/gpu_qlora_compare.py)                                              -> qlora_compare.json/.log
#   c+d) the 12 GB presets under a 12 GiB memory cap, and the projected full SFT and 200 GRPO steps
#      (benchmarks/gpu_presets.py)                                                    -> presets_12gb.json/.log
#   summary.json: each stage's exit status and seconds; setup.log: the GPU and the model build (8 files in all).
#
#   bash scripts/gpu_wheels.sh                      # once, where the registry is reachable: wheels into .whl/
#   bash scripts/gpu_check.sh OUT_DIR               # on the GPU machine (installs .whl/*.whl when needed)
#   bash scripts/gpu_check.sh --dry-run OUT_DIR     # every stage's code on CPU with the tiny model (CI runs this)
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
[ $# -eq 1 ] || { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
mkdir -p "$1" && OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# stage budgets (seconds) for an H100/H200, inside 8 minutes with the set-up; the dry run only guards against hangs
if [ $DRY = 1 ]; then T_SUITE=900 T_COMPARE=900 T_PRESETS=900; else T_SUITE=230 T_COMPARE=130 T_PRESETS=85; fi
START=$(date +%s)

if [ $DRY = 0 ]; then
  # Wheels carried with the working tree (scripts/gpu_wheels.sh), installed beside the machine's own packages.
  if ! "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
      ('unsloth', 'unsloth_zoo', 'trl', 'datasets', 'bitsandbytes', 'pydantic_settings', 'llama_cpp')))"; then
    [ -d .whl ] || { echo "error: packages missing and no .whl/ folder; run bash scripts/gpu_wheels.sh where the registry is reachable" >&2; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qmd-site .whl/*.whl \
      || { echo "error: installing .whl/*.whl failed" >&2; exit 1; }
    export PYTHONPATH="$REPO:/tmp/qmd-site"
  fi
  export QMD_UNSLOTH_CACHE=${QMD_UNSLOTH_CACHE:-/tmp/qmd-cache}
  if ! "$PY" -m qmd_unsloth.llamacpp check >/dev/null 2>&1; then
    SDIST=$(ls .whl/llama_cpp_python-*.tar.gz "$QMD_UNSLOTH_CACHE"/sdist/llama_cpp_python-*.tar.gz 2>/dev/null | head -n 1)
    [ -n "$SDIST" ] || { echo "error: no llama.cpp converter sources (.whl/llama_cpp_python-*.tar.gz); run bash scripts/gpu_wheels.sh" >&2; exit 1; }
    "$PY" -m qmd_unsloth.llamacpp prepare --sdist "$SDIST" || exit 1
  fi
  MODEL=/tmp/qmd-qwen3-1.7b-random
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/setup.log" 2>&1 || true
  [ -f "$MODEL/config.json" ] || "$PY" -m qmd_unsloth.tiny --shape qwen3-1.7b --out "$MODEL" >> "$OUT/setup.log" 2>&1 \
    || { echo "error: building the Qwen3-1.7B-shaped model failed; see $OUT/setup.log" >&2; exit 1; }
  MODEL_ARGS=(--model "$MODEL")
  export QMD_UNSLOTH_GPU_MODEL=$MODEL
else
  export QMD_UNSLOTH_GPU_DRY_RUN=1
  MODEL_ARGS=(--dry-run)
fi
SETUP=$(( $(date +%s) - START ))

STATUS=()
stage() {  # stage NAME SECONDS COMMAND...: runs under a time limit, logs to OUT/NAME.log, records the exit status
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - t0 ))
  echo "   $name: exit $rc in ${secs}s$([ $rc = 124 ] && echo ' (time limit)'); log $OUT/$name.log"
  [ $rc = 0 ] || tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
  STATUS+=("\"$name\": {\"exit\": $rc, \"seconds\": $secs}")
}

stage gpu_suite "$T_SUITE" env QMD_UNSLOTH_GPU_OUT="$OUT" "$PY" -m pytest -m gpu tests/test_gpu.py -x -q -p no:cacheprovider
stage qlora_compare "$T_COMPARE" "$PY" benchmarks/gpu_qlora_compare.py "${MODEL_ARGS[@]}" --out "$OUT/qlora_compare.json" \
  --timeout $(( T_COMPARE / 2 - 5 ))
stage presets_12gb "$T_PRESETS" "$PY" benchmarks/gpu_presets.py "${MODEL_ARGS[@]}" --out "$OUT/presets_12gb.json"

TOTAL=$(( $(date +%s) - START ))
( IFS=,; printf '{"dry_run": %s, "setup_seconds": %s, "total_seconds": %s, "stages": {%s}}\n' \
  "$([ $DRY = 1 ] && echo true || echo false)" "$SETUP" "$TOTAL" "${STATUS[*]}" ) > "$OUT/summary.json"
echo "gpu_check: $(cat "$OUT/summary.json")"
grep -q '"exit": [1-9]' "$OUT/summary.json" && exit 1
exit 0
