#!/usr/bin/env bash
# One command on a home RTX card: checks the GPU, picks a preset by VRAM, makes a venv, installs, then
# prepare -> SFT -> GRPO -> export Q4_K_M -> eval, logging into the work folder.  Re-running resumes: finished stages
# are skipped and an interrupted SFT or GRPO continues from its last checkpoint.
#
#   bash scripts/train.sh                  # GPU run (12, 16 or 24 GB presets from configs/presets/)
#   bash scripts/train.sh --smoke          # the tiny offline model on CPU: the whole pipeline in a few minutes
#   bash scripts/train.sh --workdir DIR    # where runs, logs and the GGUF go (default: runs/train, runs/smoke-train)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

SMOKE=0
WORKDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --workdir) WORKDIR="$2"; shift ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$WORKDIR" ] || WORKDIR=$([ $SMOKE = 1 ] && echo runs/smoke-train || echo runs/train)
mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
LOG="$WORKDIR/train.log"
die() { echo "error: $*" | tee -a "$LOG" >&2; exit 1; }
say() { echo "== $*" | tee -a "$LOG"; }

# --- checks: GPU, VRAM, disk -----------------------------------------------------------------------------------
FREE_GB=$(df -Pk "$WORKDIR" | awk 'NR==2 {print int($4 / 1048576)}')
if [ $SMOKE = 1 ]; then
  [ "$FREE_GB" -ge 2 ] || die "too little disk: ${FREE_GB} GB free in $WORKDIR, the smoke run needs 2 GB"
  PRESET=smoke
else
  command -v nvidia-smi >/dev/null 2>&1 || die "no NVIDIA GPU found (nvidia-smi is missing); use --smoke for a CPU run"
  VRAM_MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -d ' ')
  [ -n "$VRAM_MB" ] || die "nvidia-smi found no GPU; check the driver"
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
  VRAM_GB=$((VRAM_MB / 1024))
  if   [ "$VRAM_GB" -ge 22 ]; then PRESET=24gb
  elif [ "$VRAM_GB" -ge 15 ]; then PRESET=16gb
  elif [ "$VRAM_GB" -ge 11 ]; then PRESET=12gb
  else die "too little VRAM: $GPU_NAME has ${VRAM_GB} GB, qmd_unsloth needs at least 12 GB"; fi
  [ "$FREE_GB" -ge 25 ] || die "too little disk: ${FREE_GB} GB free in $WORKDIR, a GPU run needs 25 GB (weights, merged models, GGUF)"
  say "GPU: $GPU_NAME, ${VRAM_GB} GB -> preset $PRESET"
fi

# --- environment: reuse an active venv, else make .venv-train ------------------------------------------------------
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv-train/bin/python ] || python3 -m venv .venv-train
  # shellcheck disable=SC1091
  . .venv-train/bin/activate
fi
if ! python -c "import qmd_unsloth, trl, peft" >/dev/null 2>&1; then
  say "installing qmd_unsloth into $VIRTUAL_ENV"
  if [ $SMOKE = 1 ]; then python -m pip install -q torch==2.13.0; fi
  python -m pip install -q -e ".[$([ $SMOKE = 1 ] && echo dev || echo gpu)]" 2>&1 | tee -a "$LOG" \
    || die "pip install failed (no network for the first install?); see $LOG"
fi
if ! python -c "import llama_cpp" >/dev/null 2>&1 || ! python -m qmd_unsloth.llamacpp check >/dev/null 2>&1; then
  say "preparing llama.cpp tools (first time: builds llama-cpp-python, 10-15 min on 2 cores)"
  bash scripts/install_llama_cpp.sh 2>&1 | tee -a "$LOG" || die "could not prepare the llama.cpp tools; see $LOG"
fi

if [ $SMOKE = 1 ]; then
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
  BASE="$WORKDIR/tiny-qwen3"
  [ -f "$BASE/TINY_MODEL.json" ] || python -m qmd_unsloth.tiny --out "$BASE" 2>&1 | tee -a "$LOG"
  SFT_ARGS=(--config configs/smoke/sft.yaml --base-model "$BASE")
  GRPO_ARGS=(--config configs/smoke/grpo.yaml)
  EVAL_ARGS=(--samples 1 --max-new-tokens 48)
else
  BASE=Qwen/Qwen3-1.7B
  # The repo SFT really loads: on the Unsloth 4-bit path Unsloth's pre-quantized copy of BASE (prequantized_4bit in
  # the preset; qmd_unsloth.model.weights_repo), recorded in the run folder's versions.json and config.yaml.
  WEIGHTS=$(python -c "from qmd_unsloth import config as C; from qmd_unsloth.model import choose_backend, weights_repo
c = C.load(C.SFTConfig, 'configs/presets/sft-$PRESET.yaml'); print('WEIGHTS=' + weights_repo(c.base_model, c, choose_backend(c.backend, c.use_cpu)))" 2>/dev/null \
    | sed -n 's/^WEIGHTS=//p' | tail -n 1)
  [ -n "$WEIGHTS" ] || WEIGHTS=$BASE
  if ! python -c "from huggingface_hub import snapshot_download as s; s('$WEIGHTS', local_files_only=True)" >/dev/null 2>&1; then
    python -c "import urllib.request; urllib.request.urlopen('https://huggingface.co', timeout=10)" >/dev/null 2>&1 \
      || die "no network for the first download of $WEIGHTS (the weights SFT loads for $BASE; not in the Hugging Face cache): run hf download $WEIGHTS where there is network"
  fi
  say "base model $BASE, weights $WEIGHTS"
  SFT_ARGS=(--config "configs/presets/sft-$PRESET.yaml")
  GRPO_ARGS=(--config "configs/presets/grpo-$PRESET.yaml")
  EVAL_ARGS=(--samples 3)
fi

# --- stages (each skipped when its output exists; SFT and GRPO resume from checkpoints) ----------------------------
stage() {  # stage NAME DONE_FILE COMMAND...
  local name=$1 done_file=$2; shift 2
  if [ -e "$done_file" ]; then say "$name: done already ($done_file)"; return; fi
  say "$name"
  if ! "$@" 2>&1 | tee -a "$LOG"; then die "$name failed; see $LOG (re-run this script to resume)"; fi
}
train() {  # train STAGE ARGS...: resume a started run, else start one
  local st=$1; shift
  local resume=()
  [ -d "$WORKDIR/$st/main/checkpoints" ] && resume=(--resume)
  python -m "qmd_unsloth.$st" "$@" --output-dir "$WORKDIR" --run-name main "${resume[@]}"
}

stage "prepare" "$WORKDIR/prepared/train.jsonl" python -m qmd_unsloth.data prepare --out "$WORKDIR/prepared"
stage "sft" "$WORKDIR/sft/main/merged/config.json" train sft "${SFT_ARGS[@]}"
stage "grpo" "$WORKDIR/grpo/main/merged/config.json" train grpo "${GRPO_ARGS[@]}" --sft-model "$WORKDIR/sft/main/merged"
stage "export" "$WORKDIR/gguf/qmd-query-expansion-q4_k_m.gguf" \
  python -m qmd_unsloth.export --model "$WORKDIR/grpo/main" --out "$WORKDIR/gguf"
stage "eval" "$WORKDIR/eval/report.json" \
  python -m qmd_unsloth.eval --model "$WORKDIR/gguf/qmd-query-expansion-q4_k_m.gguf" --out "$WORKDIR/eval" "${EVAL_ARGS[@]}"

say "done: $WORKDIR/gguf/qmd-query-expansion-q4_k_m.gguf (Ollama: cd $WORKDIR/gguf && ollama create qmd-expand -f Modelfile)"
say "eval table: $WORKDIR/eval/report.md; log: $LOG"
