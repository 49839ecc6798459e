#!/usr/bin/env bash
# The first thing to run on a GPU machine: one prepared check that fits in 8 minutes on one H100
# from a bare start (a driver, Python, torch and little else; no network there).
#
#   bash tools/gpu_check.sh --download     # here, where pip works: fetch the wheels into .whl/
#   bash tools/gpu_check.sh --dry-run      # here: check the wheels list, the wheels and the plan
#   bash tools/gpu_check.sh                # there: install the wheels, run the four steps
#
# Steps, each with its own time limit, output kept in $GPU_CHECK_OUT (default /tmp/gpu_check):
#   1. the machine: GPU name, torch and CUDA versions;
#   2. bench.train: train images/s of resnet18 and efficientnet_b0 at 224x168, bf16,
#      channels_last, batch 128, through our loader (0 and the automatic worker count) vs the
#      model on in-memory tensors (the ratio; goal >= 0.9, resnet18 >= 5,000 images/s);
#   3. bench.face_speed: MTCNN alone and the default face pass on the GPU (images/s);
#   4. a mask-study search on synthetic photos at the real 384x512 (2 trials x 2 folds x 1
#      epoch, a resnet18 weights file written here, CUDA, AMP, loader workers): it must finish
#      with 2 complete trials.
# It ends with one block for the README ("GPU check ...").
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIST="$ROOT/tools/gpu_wheels.txt"
WHEELS="$ROOT/.whl"
OUTDIR="${GPU_CHECK_OUT:-/tmp/gpu_check}"
MODE=run
PYTHON="${PYTHON:-python3}"

usage() {
  echo "usage: bash tools/gpu_check.sh [--dry-run | --download] [--wheels DIR] [--list FILE]" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) MODE=dry ;;
    --download) MODE=download ;;
    --wheels) [ $# -ge 2 ] || usage; WHEELS="$2"; shift ;;
    --list) [ $# -ge 2 ] || usage; LIST="$2"; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1'" >&2; usage ;;
  esac
  shift
done

[ -f "$LIST" ] || { echo "gpu_check: $LIST: no such wheels list" >&2; exit 2; }

# The pins: NAME==VERSION, one per line; '#' comments and blank lines skipped.
PINS=()
n=0
while IFS= read -r line || [ -n "$line" ]; do
  n=$((n + 1))
  line="${line%%#*}"; line="$(echo "$line" | tr -d '[:space:]')"
  [ -z "$line" ] && continue
  if ! [[ "$line" =~ ^[A-Za-z0-9._-]+==[0-9][A-Za-z0-9.+!_-]*$ ]]; then
    echo "gpu_check: $LIST line $n: '$line' is not NAME==VERSION" >&2; exit 2
  fi
  PINS+=("$line")
done < "$LIST"
[ ${#PINS[@]} -gt 0 ] || { echo "gpu_check: $LIST lists no wheel" >&2; exit 2; }

if [ "$MODE" = download ]; then
  mkdir -p "$WHEELS"
  # The GPU image's Python is 3.12 (tools/gpu_wheels.txt says what it already holds).
  exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$WHEELS" "${PINS[@]}"
fi

# Each pin's wheel file: the name normalised as wheels spell it (PEP 427: - and . become _).
missing=()
for pin in "${PINS[@]}"; do
  name="${pin%%==*}"; version="${pin#*==}"
  stem="$(echo "$name" | tr 'A-Z.-' 'a-z__')"
  found="$(find "$WHEELS" -maxdepth 1 -iname "${stem}-${version}-*.whl" 2>/dev/null | head -1)"
  [ -n "$found" ] || missing+=("$pin")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "gpu_check: no wheel in $WHEELS for ${missing[*]}; fetch them where pip works:" \
       "bash tools/gpu_check.sh --download" >&2
  exit 2
fi

SYNTH="$OUTDIR/synth"
WEIGHTS="$OUTDIR/weights"
STEPS=(
  "machine|60|$PYTHON -c \"import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE')\""
  "train|240|$PYTHON -m bench.train --preset mask --device cuda --size 224 168 --batch 128 --amp --channels-last --backbone resnet18 efficientnet_b0 --workers 0 auto --steps 40 --windows 5"
  "faces|120|$PYTHON -m bench.face_speed --device cuda --people 40 --repeats 3"
  "search|240|$PYTHON -m core.synth --out $SYNTH --people 24 --eval-people 6 --overwrite && $PYTHON -c \"import sys, timm; from safetensors.torch import save_file; sd = timm.create_model('resnet18', num_classes=1000).state_dict(); save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[1])\" $WEIGHTS/resnet18.safetensors && $PYTHON -m search.run --study mask --data $SYNTH --weights $WEIGHTS --corrections none --trials 2 --folds 2 --epochs 1 --fix backbone=resnet18 --fix image_size=224x168 --pruner none --seed 0 --device cuda --storage sqlite:///$OUTDIR/mask.db --artifacts $OUTDIR/artifacts && $PYTHON -c \"import optuna; s = optuna.load_study(study_name='mask', storage='sqlite:///$OUTDIR/mask.db'); t = s.trials; print('search trials', [x.state.name for x in t], 'values', [round(x.value or 0, 4) for x in t], 'amp', [x.user_attrs.get('config', {}).get('amp') for x in t]); assert [x.state.name for x in t] == ['COMPLETE'] * 2\""
)

if [ "$MODE" = dry ]; then
  echo "gpu_check dry run: ${#PINS[@]} wheels listed in $LIST, all in $WHEELS"
  echo "would install: $PYTHON -m pip install --no-index --no-deps --target $OUTDIR/site $WHEELS/*.whl"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$step"
    echo "would run [$name, at most ${limit} s]: $cmd"
  done
  exit 0
fi

mkdir -p "$OUTDIR" "$WEIGHTS"
cd "$ROOT"
start=$(date +%s)
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$OUTDIR/site" "$WHEELS"/*.whl || { echo "gpu_check: installing the wheels failed" >&2; exit 1; }
export PYTHONPATH="$ROOT:$OUTDIR/site" PYTHONUNBUFFERED=1 MASK_SEARCH_CACHE="$OUTDIR/cache"

declare -A STATUS
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$step"
  echo "=== $name (at most ${limit} s) ==="
  t0=$(date +%s)
  timeout "$limit" bash -c "$cmd" 2>&1 | tee "$OUTDIR/$name.log"
  rc=${PIPESTATUS[0]}
  STATUS[$name]="rc=$rc $(( $(date +%s) - t0 )) s"
done

echo
echo "GPU check $(date -u +%Y-%m-%d), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(( $(date +%s) - start )) s in all"
grep -h "^torch" "$OUTDIR/machine.log"
grep -h -A40 "^ratios" "$OUTDIR/train.log" | sed -n '1,12p'
grep -h "images/s  (windows\|^resnet18\|^efficientnet_b0" "$OUTDIR/train.log"
grep -h "^face_speed" "$OUTDIR/faces.log"
grep -h "^search trials" "$OUTDIR/search.log"
for step in "${STEPS[@]}"; do
  name="${step%%|*}"; echo "step $name: ${STATUS[$name]}"
done
