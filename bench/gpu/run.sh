#!/usr/bin/env bash
# The GPU proof on a lent device (bench/gpu/README.md), from the repository root, once
# unpack.sh has made KIT:
#   bench/gpu/run.sh KIT PRESET OUT_DIR [PHASE...]
# Phases, by default all in this order:
#   base     the checkpoint's tokenizer, template and config (engine.js base)
#   weights  random bf16 weights of PRESET's shape (weights.py, on the GPU)
#   build    axis-model build --dtype bf16 (engine.js build)
#   measure  the engine on CUDA (engine.js measure -> engine.json)
#   hf       transformers on the same weights and tokens (hf.py -> hf.json)
#   report   the figures (engine.js report -> report.txt)
# A finished phase leaves a mark in the work folder (/tmp/axis-gpu/PRESET) and is skipped when
# asked again, so a call cut by the device's time limit goes on in the next call. The log
# (OUT_DIR/<date>-PRESET.log, with nvidia-smi and versions), engine.json, hf.json and
# report.txt land in OUT_DIR. AXIS_GPU_MEASURE_FLAGS adds flags to engine.js measure (after the
# fallback's: the later of two equal flags wins).
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: bench/gpu/run.sh KIT PRESET OUT_DIR [PHASE...]" >&2; exit 2; }
KIT=$(cd "$1" && pwd)
PRESET=$2
OUTDIR=$3
shift 3
PHASES=${*:-base weights build measure hf report}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=/tmp/axis-gpu/$PRESET
mkdir -p "$WORK" "$OUTDIR"
exec > >(tee -a "$OUTDIR/$(date -u +%F)-$PRESET.log") 2>&1
NODE=$KIT/node/bin/node
ENGINE=$KIT/app/dist/bench/gpu/engine.js
case $PRESET in gemma*) ARCH=gemma2 ;; *) ARCH=llama ;; esac

# Python with torch and transformers: the device's venv.
PY=${AXIS_GPU_PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3 python /opt/venv/bin/python3 "$HOME/venv/bin/python3" "$HOME/.venv/bin/python3"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import torch, transformers' 2>/dev/null; then PY=$(command -v "$c"); break; fi
  done
fi
[ -n "$PY" ] || { echo "run.sh: no python with torch and transformers here (set AXIS_GPU_PYTHON)"; exit 1; }
# onnxruntime's CUDA provider loads CUDA 13's libraries and cuDNN 9 from the venv's nvidia wheels.
SITE=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
LIBS=$({ find "$SITE/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null || true; } | sort -u | paste -sd: -)
[ -n "$LIBS" ] || echo "run.sh: no libraries under $SITE/nvidia (the venv's CUDA wheels): onnxruntime's CUDA provider will look on the system's path"
export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

echo "== $(date -u +%FT%TZ) bench/gpu/run.sh $PRESET, phases: $PHASES"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
echo "node $("$NODE" --version); onnxruntime-node $("$NODE" -p "require('$KIT/app/node_modules/onnxruntime-node/package.json').version")"
"$PY" -c 'import torch, transformers; print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
TOTAL_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0 | tr -d ' ')

phase() {
  local name=$1
  shift
  if [ -f "$WORK/done-$name" ]; then echo "== $name: done in an earlier call"; return; fi
  echo "== $name ($(date -u +%T))"
  local started=$SECONDS
  "$@"
  touch "$WORK/done-$name"
  echo "== $name: $((SECONDS - started)) s"
}
build() {
  rm -rf "$WORK/model"
  "$NODE" "$ENGINE" build --hf "$WORK/ckpt" --out "$WORK/model" --dtype bf16
}
# A measure that fails with the engine's defaults is tried again with prompts running alone (not
# in a decoding step's run), then with the host drawing the tokens as well: each is a part of the
# CUDA path only a device shows, and a figure without it is still a figure. The fallback reached
# is kept in the work folder, so a later call starts there. (A call cut by the time limit is
# killed whole and falls back to nothing.)
FALLBACKS=("" "--join off" "--join off --sample host")
measure() {
  local level
  level=$(cat "$WORK/measure-fallback" 2>/dev/null || echo 0)
  while [ "$level" -lt ${#FALLBACKS[@]} ]; do
    echo "== measure with ${FALLBACKS[$level]:-the defaults of the engine}"
    # The plan gets the GPU less 2 GiB (the CUDA context and cuDNN's workspace).
    # shellcheck disable=SC2086
    if "$NODE" "$ENGINE" measure --model "$WORK/model" --device cuda --device-memory "$((TOTAL_MIB - 2048))MiB" --lengths "$KIT/answer_lengths.json" --out "$WORK/engine.json" ${FALLBACKS[$level]} ${AXIS_GPU_MEASURE_FLAGS:-}; then
      return 0
    fi
    level=$((level + 1))
    echo "$level" >"$WORK/measure-fallback"
    [ "$level" -lt ${#FALLBACKS[@]} ] && echo "== measure failed (the error above); again with ${FALLBACKS[$level]}"
  done
  return 1
}
for p in $PHASES; do
  case $p in
    base) phase base "$NODE" "$ENGINE" base --arch "$ARCH" --out "$WORK/ckpt" ;;
    weights) phase weights "$PY" "$HERE/weights.py" --preset "$PRESET" --ckpt "$WORK/ckpt" ;;
    build) phase build build ;;
    measure) phase measure measure ;;
    hf) phase hf "$PY" "$HERE/hf.py" --ckpt "$WORK/ckpt" --engine "$WORK/engine.json" --out "$WORK/hf.json" ;;
    report) "$NODE" "$ENGINE" report --engine "$WORK/engine.json" --hf "$WORK/hf.json" | tee "$WORK/report.txt" ;;
    *) echo "run.sh: unknown phase $p (base weights build measure hf report)"; exit 2 ;;
  esac
done
for f in engine.json hf.json report.txt; do [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUTDIR/" || true; done
